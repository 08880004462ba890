"""Checks every subcommand runs on its options before any work (loading, predicting, writing).

Each raises :class:`aimkp.errors.UsageError` with a message naming the option and the value.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aimkp.errors import UsageError

if TYPE_CHECKING:  # the data package is imported by the subcommand that reads data, when it runs
    from aimkp.data.options import ReadKwargs

VERBOSE_HELP = "debug logging; tracebacks for user errors too"


def add_verbose(parser: Any) -> None:
    """``-v``; SUPPRESS: a ``-v`` given earlier (``aimkp -v train``) is not reset to False by a
    subparser's default."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
    )


def check_device(spec: str | None) -> str | None:
    """``spec`` as given when it names a usable torch device (``None``: the default)."""
    if spec is None:
        return None
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {spec!r} is not a torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    return spec


def _first_existing(path: pathlib.Path) -> pathlib.Path:
    for cand in (path, *path.parents):
        if cand.exists():
            return cand
    return pathlib.Path(".")


def check_output_dir(path: str | os.PathLike[str], flag: str) -> pathlib.Path:
    """A directory that can be created (or exists) and written; nothing is created here."""
    p = pathlib.Path(path)
    _check_creatable(p, p, flag)
    return p


def check_output_file(path: str | os.PathLike[str], flag: str) -> pathlib.Path:
    """A file that can be written: not a directory, its directory creatable and writable."""
    p = pathlib.Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {p}: is a directory, not a file")
    _check_creatable(p.parent, p, flag)
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{flag} {p}: is not writable")
    return p


def _check_creatable(directory: pathlib.Path, shown: pathlib.Path, flag: str) -> None:
    base = _first_existing(directory)
    if not base.is_dir():
        where = "is a file" if base == shown else f"is under the file {base}"
        raise UsageError(f"{flag} {shown}: {where}, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {shown}: {base} is not writable")


def add_read_arguments(parser: Any) -> None:
    """``--image-dir``, ``--on-missing-image``, ``--on-bad-record``: how data files are read
    (help and choices from the :class:`aimkp.train.TrainConfig` fields of the same names)."""
    import dataclasses

    from aimkp.train.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in ("image_dir", "on_missing_image", "on_bad_record"):
        f = fields[name]
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        parser.add_argument(
            "--" + name.replace("_", "-"), default=f.default, help=f.metadata["help"], **extra
        )


def read_options(args: Any, spec: str, *, with_images: bool = True) -> ReadKwargs:
    """The reader keyword arguments of a subcommand's parsed ``add_read_arguments`` flags."""
    from aimkp.data.options import reader_options

    return reader_options(
        spec,
        image_dir=args.image_dir,
        on_missing_image=args.on_missing_image,
        on_bad_record=args.on_bad_record,
        with_images=with_images,
    )


@contextlib.contextmanager
def removed_if_empty(path: str | os.PathLike[str]) -> Iterator[None]:
    """On an exception, remove the directories under ``path`` that the block created and left
    empty (a run that failed before writing anything leaves no run directory behind)."""
    p = pathlib.Path(path).absolute()
    keep = _first_existing(p)
    try:
        yield
    except BaseException:
        for d in (p, *p.parents):
            if d == keep or not d.is_dir() or any(d.iterdir()):
                break
            d.rmdir()
        raise
