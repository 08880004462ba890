"""``aimkp predict --out F.jsonl`` killed with SIGKILL part-way, refused without ``--resume``,
resumed with it, and compared post by post with an uninterrupted run (tiny-llava preset)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
N_POSTS = 40


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _cmd(out: pathlib.Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "aimkp",
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
    out = tmp_path_factory.mktemp("full") / "pred.jsonl"
    res = _run(out)
    assert res.returncode == 0, res.stderr
    assert f"predicted {N_POSTS} posts, skipped 0, resumed 0" in res.stderr.splitlines()[-1]
    return _by_id(out)


def test_killed_run_refused_then_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "pred.jsonl"
    written = _kill_after_lines(out, 8)
    assert 8 <= written < N_POSTS
    before = out.read_bytes()

    refused = _run(out)
    assert refused.returncode == 2
    err = refused.stderr.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "Traceback" not in refused.stderr
    assert out.read_bytes() == before, "a refused run touched the output"

    resumed = _run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    last = resumed.stderr.strip().splitlines()[-1]
    assert f"predicted {N_POSTS - written} posts" in last and f"resumed {written}" in last

    got = _by_id(out)
    assert set(got) == set(uninterrupted), "posts missing or extra after the resume"
    for rid, want in uninterrupted.items():
        assert got[rid] == want, f"post {rid} differs from the uninterrupted run"
