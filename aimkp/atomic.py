"""Whole-directory writes: a checkpoint directory is written to a temporary sibling, flushed
(every file fsync'ed) and swapped in with renames, so a reader (or a resume after a crash) sees
the old directory or the new one, never a mix.

>>> with atomic_dir(out / "last") as tmp:     # write everything under tmp
...     save_checkpoint(tmp, loaded)
# on success: out/last -> out/.last.old, tmp -> out/last, out/.last.old removed

A full disk (``ENOSPC``, torch's ``inline_container.cc`` write failure, or any write error on a
disk left with almost no free space) becomes one :class:`~aimkp.errors.UsageError` naming the
directory, the free space and the space needed (it is the user's disk); the temporary directory
is removed and the previous one is left as it was. :func:`no_space_is_usage_error` does the same
for the other files a command writes (``metrics.csv``, a report).

Permissions: every file written under the temporary directory gets the mode a plain ``open()``
would give under the process's umask (``0o666 & ~umask``); some writers (safetensors) create
their files ``0o600``, which left a checkpoint unreadable to the other users of a shared run
directory.
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


#: free bytes under which a failed write is taken for a full disk, whatever its message
NEARLY_FULL = 1 << 20


def is_no_space(exc: BaseException, where: str | os.PathLike[str] | None = None) -> bool:
    """True for a write that failed because the disk is full: ``ENOSPC`` / ``EDQUOT``, the
    messages torch and safetensors give for it, or (``where`` given) any ``OSError`` /
    ``RuntimeError`` while the disk under ``where`` has less than :data:`NEARLY_FULL` free
    (torch's zip writer reports a full disk as ``unexpected pos N vs M``)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    msg = str(exc)
    if "No space left" in msg or "Disk quota exceeded" in msg:
        return True
    if isinstance(exc, RuntimeError) and "inline_container" in msg:
        if "write" in msg.lower() or "unexpected pos" in msg:
            return True
    if where is not None and isinstance(exc, (OSError, RuntimeError)):
        return free_bytes(where) < NEARLY_FULL
    return False


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    p = pathlib.Path(path).absolute()
    for cand in (p, *p.parents):
        if cand.exists():
            return shutil.disk_usage(cand).free
    return 0


def tree_bytes(root: pathlib.Path) -> int:
    """Bytes of the files under ``root`` (0 when it does not exist)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def no_space_message(target: pathlib.Path, need: int | None, written: int = 0) -> str:
    """The one line of a full disk: the path, the free space, the space needed."""
    free = free_bytes(target)
    if need is not None:
        wanted = f"about {need / 2**20:.1f} MiB needed"
    else:  # the part written before the failure: a lower bound
        wanted = f"at least {max(written, 1) / 2**20:.1f} MiB needed"
    return (
        f"no space left on device writing {target}: {free / 2**20:.1f} MiB free, {wanted}; "
        "free some space and run the command again"
    )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: pathlib.Path, pattern: str | None = None) -> None:
    """Every file under ``root`` (``pattern``: only those it matches, e.g. ``*.safetensors``)
    to ``0o666 & ~umask`` (what ``open()`` creates)."""
    mode = 0o666 & ~_umask()
    if pattern is not None:
        for path in root.glob(pattern):
            if path.is_file():
                os.chmod(path, mode)
        return
    for dirpath, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(dirpath, name), mode)


@contextlib.contextmanager
def no_space_is_usage_error(target: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """A full disk in the block becomes one UsageError naming the file that failed (or
    ``target``) and the free space left; any other error passes unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        failed = getattr(exc, "filename", None) or target
        if failed is None or not is_no_space(exc, failed):
            raise
        raise UsageError(no_space_message(pathlib.Path(failed), None)) from None


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
def atomic_dir(
    final: str | os.PathLike[str], need_bytes: int | None = None
) -> Iterator[pathlib.Path]:
    """Yield a fresh temporary sibling of ``final`` to write into; swap it in on success.
    ``need_bytes``: the expected size, named when the disk fills up."""
    final = pathlib.Path(final)
    tmp = _sibling(final, f"tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        apply_umask(tmp)
        fsync_tree(tmp)
    except BaseException as exc:
        full = is_no_space(exc, final.parent)
        written = tree_bytes(tmp) if full else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            kept = f"; the previous {final.name} is kept" if final.exists() else ""
            raise UsageError(no_space_message(final, need_bytes, written) + kept) from None
        raise
    swap_in(tmp, final)
