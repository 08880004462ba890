"""A run directory belongs to one run: a second run into a directory in use is refused at once
(one line, exit 2), a stale lock of a dead process is taken over, the lock is released at exit,
and only rank 0 locks."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from aimkp.errors import UsageError
from aimkp.runs.lock import LOCK_FILE, acquire, check_not_in_use, release, run_lock


def _write_lock(out, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


def test_second_run_into_a_directory_in_use_is_refused(tmp_path, capsys) -> None:
    from aimkp.cli import main

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        _write_lock(out, owner.pid)
        code = main(["train", "--preset", "tiny-llava", "--output", str(out), "--no-eval"])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("aimkp")]
        assert code == 2 and len(err) == 1
        assert f"in use by another run (pid {owner.pid}" in err[0]
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == owner.pid  # left alone
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        owner.kill()
        owner.wait()


def test_lock_on_another_host_is_refused(tmp_path) -> None:
    _write_lock(tmp_path, 1, host="some-other-host")
    with pytest.raises(UsageError, match="some-other-host"):
        acquire(tmp_path)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, dead.pid)
    with caplog.at_level(logging.WARNING, logger="aimkp.train"):
        with run_lock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()  # released at exit


def test_released_on_error_and_not_taken_by_other_ranks(tmp_path) -> None:
    with pytest.raises(RuntimeError), run_lock(tmp_path / "a"):
        raise RuntimeError("boom")
    assert not (tmp_path / "a" / LOCK_FILE).exists()
    with run_lock(tmp_path / "b", enabled=False):
        assert not (tmp_path / "b" / LOCK_FILE).exists()
    path = acquire(tmp_path / "c")
    _write_lock(tmp_path / "c", os.getpid() + 1)  # someone else's now: release leaves it
    release(path)
    assert path.exists()


def test_other_ranks_of_the_locking_job_pass_the_check(tmp_path, monkeypatch) -> None:
    """Under torchrun rank 0 may take the lock before another rank checks the output: the
    check passes for the same job (rendezvous id) and refuses any other."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    acquire(tmp_path)
    check_not_in_use(tmp_path)  # another rank of job-a
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    with pytest.raises(UsageError, match="in use by another run"):
        check_not_in_use(tmp_path)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    with pytest.raises(UsageError, match="in use by another run"):
        check_not_in_use(tmp_path)
