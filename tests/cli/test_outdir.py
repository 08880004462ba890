"""The output-directory policy's allowed side (the refusals are cases of the contract table):
a new or empty directory, the run being resumed (its directory or its last/), a directory
holding only a stale lock; an export into a new directory outside every checkpoint; a report
beside, not inside, a run's checkpoints."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from aimkp.errors import UsageError
from aimkp.runs.lock import LOCK_FILE
from aimkp.runs.outdir import (
    check_new_model_dir,
    check_output_outside,
    check_run_output,
    is_run_dir,
)


@pytest.fixture
def run(tmp_path):
    d = tmp_path / "run"
    (d / "last").mkdir(parents=True)
    (d / "best").mkdir()
    (d / "config.json").write_text("{}")
    (d / "last" / "train_state.pt").write_bytes(b"x")
    (d / "best" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (d / "base").mkdir()
    (d / "base" / "model.safetensors").write_bytes(b"x")
    return d


def test_new_empty_and_resumed_run_directories_are_allowed(tmp_path, run) -> None:
    assert check_run_output(tmp_path / "new" / "run") == (tmp_path / "new" / "run").resolve()
    (tmp_path / "empty").mkdir()
    check_run_output(tmp_path / "empty")
    check_run_output(run, resume=run)
    check_run_output(run, resume=run / "last")  # --resume DIR/last names the same run
    assert is_run_dir(run) and not is_run_dir(run / "best")


def test_a_finished_run_is_refused_with_the_way_to_continue_it(run) -> None:
    with pytest.raises(UsageError, match=f"continue it with --resume {run}"):
        check_run_output(run)


def test_a_stale_lock_alone_is_an_empty_directory(tmp_path) -> None:
    d = tmp_path / "crashed"
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    check_run_output(d)


def test_an_export_goes_to_a_new_directory_outside_the_checkpoints(tmp_path, run) -> None:
    check_new_model_dir(tmp_path / "merged", run / "best")
    check_new_model_dir(run / "merged", run / "best")  # beside best/, in the run directory
    for inside in (run / "base", run / "last" / "x", run / "best", run / "step-000002"):
        if inside.name.startswith("step-"):
            inside.mkdir()
        with pytest.raises(UsageError, match="inside the checkpoint"):
            check_new_model_dir(inside, run / "best")


def test_a_report_goes_beside_the_checkpoints(tmp_path, run) -> None:
    check_output_outside(run / "eval", run / "best", "--output")
    check_output_outside(tmp_path / "pred.txt", run / "best", "--out")
    with pytest.raises(UsageError, match="inside the checkpoint"):
        check_output_outside(run / "best" / "pred.txt", run / "best", "--out")
    with pytest.raises(UsageError, match="inside the checkpoint"):
        check_output_outside(run / "last" / "pred.txt", run / "best", "--out")
