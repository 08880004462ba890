"""Checkpoints survive anything: a directory is swapped in whole, a failed or full-disk write
leaves the previous one intact and no temporary files, a crash between the renames is
recovered, and a disk too small for a checkpoint is named before the first step."""

from __future__ import annotations

import errno
from collections import namedtuple

import pytest

from aimkp.atomic import atomic_dir, recover
from aimkp.errors import UsageError


def _dir(path, text: str):
    path.mkdir(parents=True, exist_ok=True)
    (path / "a.txt").write_text(text)
    (path / "b.txt").write_text(text)


def _siblings(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_swap_replaces_the_whole_directory(tmp_path) -> None:
    _dir(tmp_path / "last", "old")
    (tmp_path / "last" / "stale.txt").write_text("x")
    with atomic_dir(tmp_path / "last") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".last.tmp-")
        _dir(tmp, "new")
    assert _siblings(tmp_path) == ["last"]
    assert _siblings(tmp_path / "last") == ["a.txt", "b.txt"]
    assert (tmp_path / "last" / "b.txt").read_text() == "new"


@pytest.mark.parametrize(
    "exc, error", [(OSError(errno.ENOSPC, "No space left on device"), UsageError),
                   (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                 "file write failed"), UsageError),
                   (KeyError("bug"), KeyError)],
)  # fmt: skip
def test_failed_write_keeps_the_old_directory(tmp_path, exc, error) -> None:
    _dir(tmp_path / "last", "old")
    with pytest.raises(error) as info, atomic_dir(tmp_path / "last") as tmp:
        (tmp / "a.txt").write_text("half")
        raise exc
    if error is UsageError:
        assert "no space left on device" in str(info.value) and "last" in str(info.value)
    assert _siblings(tmp_path) == ["last"]  # no temporary directory left
    assert (tmp_path / "last" / "a.txt").read_text() == "old"


def test_crash_between_the_renames_is_recovered(tmp_path) -> None:
    _dir(tmp_path / ".last.old", "old")  # last renamed aside, the new one never renamed in
    _dir(tmp_path / ".last.tmp-99999", "half")
    recover(tmp_path / "last")
    assert _siblings(tmp_path) == ["last"]
    assert (tmp_path / "last" / "a.txt").read_text() == "old"


ARGS = ["train", "--preset", "tiny-llava", "--max-train-samples", "4", "--batch-size", "2",
        "--no-eval", "--lora-r", "4", "--threads", "1"]  # fmt: skip


def _error_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("aimkp")]


def test_too_little_free_space_is_named_before_the_first_step(tmp_path, monkeypatch, capsys):
    import aimkp.runs.checkpoints as C
    from aimkp.cli import main

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(C.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 4096, 4096))
    steps = []
    monkeypatch.setattr("aimkp.train.epoch.optimizer_step", lambda run, used: steps.append(1))
    out = tmp_path / "run"
    code = main([*ARGS, "--output", str(out), "--epochs", "1"])
    err = _error_lines(capsys)
    assert code == 2 and len(err) == 1
    assert "not enough free space for the run's checkpoints" in err[0]
    assert steps == [] and not (out / "last").exists()


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import aimkp.runs.checkpoints as C
    from aimkp.cli import main
    from aimkp.runs.state import read_train_state

    real = C.write_train_state
    calls = []

    def full_on_second(run, directory, partial):
        calls.append(1)
        if len(calls) == 2:
            (directory / "train_state.pt.tmp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(run, directory, partial)

    monkeypatch.setattr(C, "write_train_state", full_on_second)
    out = tmp_path / "run"
    code = main([*ARGS, "--output", str(out), "--epochs", "2"])
    err = _error_lines(capsys)
    assert code == 2 and len(err) == 1 and "no space left on device" in err[0]
    assert read_train_state(out)["epoch"] == 1  # the first epoch's last/ is intact
    assert not [p.name for p in out.iterdir() if p.name.startswith(".last")]
    assert not (out / "best").exists()  # --no-eval: no best
