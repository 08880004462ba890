"""Interrupted runs lose nothing: a run killed with SIGKILL at a random moment after its first
mid-epoch save, or stopped with SIGTERM, resumes bit-exactly (final trainable weights equal to
an uninterrupted run's, deterministic CPU mode, dropout on)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from aimkp.runs.state import read_train_state

ARGS = [
    "--preset", "tiny-llava", "--data", "default", "--max-train-samples", "8",
    "--batch-size", "2", "--epochs", "2", "--no-eval", "--lora-r", "4", "--lora-alpha", "8",
    "--lr", "5e-3", "--threads", "1", "--seed", "5", "--save-every", "1", "--keep-last", "2",
]  # fmt: skip
TOTAL_STEPS = 8  # 2 epochs x 4 optimizer steps


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}


def _train(out, *extra: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "aimkp", "train", *ARGS, "--output", str(out), *extra]
    return subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _wait_for(path, proc: subprocess.Popen) -> None:
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)


def _trainable(out) -> dict[str, torch.Tensor]:
    st = read_train_state(out)
    assert st["step"] == TOTAL_STEPS and st["epoch_step"] == 0
    return st["trainable"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    code, err = _finish(_train(out))
    assert code == 0, err[-2000:]
    return _trainable(out)


def _resume_and_compare(out, reference) -> None:
    code, err = _finish(_train(out, "--resume", str(out)))
    assert code == 0, err[-2000:]
    got = _trainable(out)
    assert got.keys() == reference.keys() and got
    for n in got:
        assert torch.equal(got[n], reference[n]), n


def test_sigkill_at_a_random_moment_then_resume_is_bit_exact(tmp_path, reference) -> None:
    out = tmp_path / "run"
    proc = _train(out)
    _wait_for(out / "step-000001", proc)
    time.sleep(random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    st = read_train_state(out)  # whole: the old or the new last/, never a mix
    assert 1 <= st["step"] <= TOTAL_STEPS
    _resume_and_compare(out, reference)
    assert not list(out.glob(".last.*"))  # the resumed run's saves cleaned up


def test_sigterm_saves_last_and_exits_143(tmp_path, reference) -> None:
    out = tmp_path / "run"
    proc = _train(out)
    _wait_for(out / "step-000002", proc)
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert code == 143, err[-2000:]
    assert f"resume with: aimkp train --resume {out}" in err
    st = read_train_state(out)
    assert 2 <= st["step"] < TOTAL_STEPS  # stopped early, after finishing its step
    assert not (out / ".aimkp-lock").exists()  # the lock is released on the way out
    _resume_and_compare(out, reference)
