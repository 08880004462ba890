"""Whole-directory writes: a checkpoint directory is written to a temporary sibling, flushed
(every file fsync'ed) and swapped in with renames, so a reader (or a resume after a crash) sees
the old directory or the new one, never a mix.

>>> with atomic_dir(out / "last") as tmp:     # write everything under tmp
...     save_checkpoint(tmp, loaded)
# on success: out/last -> out/.last.old, tmp -> out/last, out/.last.old removed

A full disk (``ENOSPC``, or torch's ``inline_container.cc`` write failure) becomes one
:class:`~aimkp.errors.UsageError` naming the directory (it is the user's disk); the temporary
directory is removed and the previous one is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
from collections.abc import Iterator

from aimkp.errors import UsageError


def _sibling(final: pathlib.Path, tag: str) -> pathlib.Path:
    return final.parent / f".{final.name}.{tag}"


def is_no_space(exc: BaseException) -> bool:
    """True for a write that failed because the disk is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "No space left" in msg or ("inline_container" in msg and "write" in msg.lower())
    )


def fsync_tree(root: pathlib.Path) -> None:
    """fsync every file under ``root``, then the directories (so the names are durable)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(pathlib.Path(dirpath))


def _fsync_dir(d: pathlib.Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def swap_in(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """``tmp`` becomes ``final``: the old ``final`` renamed aside, ``tmp`` renamed in, the old
    one removed."""
    old = _sibling(final, "old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: pathlib.Path) -> None:
    """After a crash: put the old directory back when the crash came between the two renames
    of :func:`swap_in`, and remove temporary siblings a killed writer left (the caller owns the
    run directory: see :mod:`aimkp.runs.lock`)."""
    old = _sibling(final, "old")
    if not final.exists() and old.is_dir():
        old.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
    """Yield a fresh temporary sibling of ``final`` to write into; swap it in on success."""
    final = pathlib.Path(final)
    tmp = _sibling(final, f"tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(exc):
            raise UsageError(
                f"no space left on device writing {final}; the previous {final.name} is kept"
            ) from None
        raise
    swap_in(tmp, final)
