"""A run directory belongs to one run: ``OUTPUT/.aimkp-lock`` holds the owner's pid and host.

A second run into a directory in use is refused at once (:class:`~aimkp.errors.UsageError`,
one line, exit 2); a lock left by a dead process on this host is taken over with a warning.
Under torchrun only rank 0 locks (the lock names the job, so the other ranks' checks, which may
run after rank 0 took it, let it pass). Released when the run ends, however it ends (but SIGKILL:
then the next run finds the owner dead and takes the lock over).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import socket
from collections.abc import Iterator

from aimkp.errors import UsageError

log = logging.getLogger("aimkp.train")

LOCK_FILE = ".aimkp-lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner(path: pathlib.Path) -> dict[str, object]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}  # unreadable / half-written: treated as stale


def _job() -> str | None:
    """The torchrun job this process belongs to (its rendezvous id), None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def acquire(out: pathlib.Path) -> pathlib.Path:
    """Create ``out`` and take its lock; UsageError when a live run holds it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    me: dict[str, object] = {"pid": os.getpid(), "host": socket.gethostname(), "job": _job()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(path, me)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise UsageError(f"--output {out}: could not take the lock {path}")


def check_not_in_use(out: pathlib.Path) -> None:
    """UsageError when a live run holds the lock of ``out`` (nothing is changed here)."""
    path = out / LOCK_FILE
    if path.exists():
        job = _job()
        if job is not None and _owner(path).get("job") == job:
            return  # rank 0 of this very torchrun job took it already
        _refuse_if_live(path, {"host": socket.gethostname()})


def _refuse_if_live(path: pathlib.Path, me: dict[str, object]) -> dict[str, object]:
    owner = _owner(path)
    pid, host = owner.get("pid"), owner.get("host")
    if isinstance(pid, int) and (host != me["host"] or _alive(pid)):
        raise UsageError(
            f"--output {path.parent}: in use by another run (pid {pid} on {host}, lock file "
            f"{path}); wait for it, choose another --output, or remove the lock file if that "
            "run is gone"
        )
    return owner


def _take_over_if_stale(path: pathlib.Path, me: dict[str, object]) -> None:
    owner = _refuse_if_live(path, me)
    log.warning("taking over the stale lock %s of a run that is gone (%s)", path, owner)
    path.unlink(missing_ok=True)


def release(path: pathlib.Path) -> None:
    """Remove the lock when this process holds it."""
    if _owner(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(output: str | os.PathLike[str], enabled: bool = True) -> Iterator[None]:
    """Hold the lock of the run directory ``output`` for the block (``enabled=False``: no-op,
    for ranks other than 0)."""
    if not enabled:
        yield
        return
    path = acquire(pathlib.Path(output))
    try:
        yield
    finally:
        release(path)
