"""The ``aimkp`` command line: one module per subcommand under ``aimkp/cli/``.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when its subcommand runs. The subcommand modules import
the torch-heavy parts of aimkp inside ``run`` (and its helpers), the one place in aimkp where
imports stay inside functions: parsing the arguments (``--help``, a bad flag) stays instant and
torch-free.

Errors: a :class:`aimkp.errors.UsageError` (bad option, bad data, missing file; see
:mod:`aimkp.errors` for the rule) raised anywhere in a subcommand is caught here once: one line
``aimkp COMMAND: error: ...`` on stderr, exit status 2, no traceback. Any other exception is an
internal error and propagates with its traceback. ``-v`` (before or after the subcommand) shows
the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from aimkp.cli._common import VERBOSE_HELP, add_verbose
from aimkp.errors import NONFINITE_EXIT, NonFiniteError, UsageError

SUBCOMMANDS = {
    "train": "aimkp.cli.train",
    "predict": "aimkp.cli.predict",
    "score": "aimkp.cli.score",
    "evaluate": "aimkp.cli.evaluate",
    "compare": "aimkp.cli.compare",
    "data": "aimkp.cli.data",
    "export": "aimkp.cli.export",
    "bench": "aimkp.cli.bench",
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, ModuleType | None]:
    parser = argparse.ArgumentParser(prog="aimkp", description="AimKP multimodal keyphrase toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    words = [a for a in argv if not a.startswith("-")]
    wanted = words[0] if words and words[0] in SUBCOMMANDS else None
    module = None
    for name, modname in SUBCOMMANDS.items():
        if wanted is not None and name != wanted:
            sub.add_parser(name)
            continue
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name != modname:
                raise
            continue
        p = sub.add_parser(name, help=getattr(mod, "HELP", None), description=mod.__doc__)
        add_verbose(p)
        mod.add_arguments(p)
        if name == wanted:
            module = mod
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    args.argv = argv  # which flags were given (``aimkp train --resume DIR`` keeps the others)
    try:
        return int(module.run(args) or 0)
    except UsageError as exc:
        if args.verbose:
            raise
        print(f"aimkp {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:  # training diverged: one line, exit 3
        if args.verbose:
            raise
        print(f"aimkp {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return NONFINITE_EXIT


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
