"""The ``aimkp`` command line: one module per subcommand under ``aimkp/cli/``.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when its subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": "aimkp.cli.train",
    "predict": "aimkp.cli.predict",
    "score": "aimkp.cli.score",
    "evaluate": "aimkp.cli.evaluate",
    "compare": "aimkp.cli.compare",
    "data": "aimkp.cli.data",
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object]:
    parser = argparse.ArgumentParser(prog="aimkp", description="AimKP multimodal keyphrase toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
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
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
