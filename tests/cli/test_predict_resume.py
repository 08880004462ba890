"""``aimkp predict --out F.jsonl`` killed with SIGKILL part-way (a subprocess), refused without
``--resume``, resumed with it (a fresh subprocess), and compared post by post with an
uninterrupted run (tiny-llava preset, 40 posts of the committed test split, batches of 4)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from aimkp.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]
N_POSTS = 40


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _argv(out: pathlib.Path, *extra: str) -> list[str]:
    """``aimkp predict`` arguments of every run here."""
    return [
        "predict",
        "--checkpoint",
        "tiny-llava",
        "--data",
        "default",
        "--split",
        "test",
        "--limit",
        str(N_POSTS),
        "--batch-size",
        "4",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def _cmd(out: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aimkp", *_argv(out, *extra)]


def _run(out: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(out, *extra), env=_env(), capture_output=True, text=True, timeout=600
    )


def _by_id(path: pathlib.Path) -> dict[str, dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    objs = [json.loads(line) for line in lines]
    ids = [o["id"] for o in objs]
    assert len(ids) == len(set(ids)), "a post was written twice"
    return {o["id"]: o for o in objs}


def _kill_after_lines(out: pathlib.Path, n_lines: int) -> int:
    """Start a run, SIGKILL it once ``out`` holds ``n_lines`` lines; lines written then."""
    out_null = subprocess.DEVNULL
    proc = subprocess.Popen(_cmd(out), env=_env(), stdout=out_null, stderr=out_null)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_file() and out.read_bytes().count(b"\n") >= n_lines:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return out.read_bytes().count(b"\n")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, dict]:
    """The same command run to the end (in this process: a fresh process adds nothing here)."""
    out = tmp_path_factory.mktemp("full") / "pred.jsonl"
    assert main(_argv(out)) == 0
    return _by_id(out)


def test_killed_run_refused_then_resumed_equals_uninterrupted(uninterrupted, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    written = _kill_after_lines(out, 4)  # after the first batch: 9 batches still to come
    assert 4 <= written < N_POSTS
    before = out.read_bytes()

    capsys.readouterr()
    assert main(_argv(out)) == 2  # refused, in this process: main prints what the CLI does
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "exists and is not empty" in err[0]
    assert out.read_bytes() == before, "a refused run touched the output"

    resumed = _run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    last = resumed.stderr.strip().splitlines()[-1]
    assert f"predicted {N_POSTS - written} posts" in last and f"resumed {written}" in last

    got = _by_id(out)
    assert set(got) == set(uninterrupted), "posts missing or extra after the resume"
    for rid, want in uninterrupted.items():
        assert got[rid] == want, f"post {rid} differs from the uninterrupted run"
