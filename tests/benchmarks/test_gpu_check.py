"""``make gpu-check``'s script on a machine without CUDA: every GPU step is skipped with its
reason, the JSON says so, and the command exits 0."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
GPU_STEPS = {
    "wheels",
    "install",
    "cuda_tests",
    "sanitizer",
    "bench_masked_embedding",
    "bench_grad_gram",
    "bench_train_step",
    "bench_train_step_qwen2vl7b",
    "bench_breakdown",
    "memory_plan",
}


def _run(out: pathlib.Path, *flags: str) -> tuple[int, dict]:
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (out / "gpu_check.json").is_file(), p.stdout + p.stderr
    return p.returncode, json.loads((out / "gpu_check.json").read_text())


def _check(report: dict, reason: str) -> None:
    by_name = {s["name"]: s for s in report["steps"]}
    assert set(by_name) == GPU_STEPS | {"env"}
    assert by_name["env"]["status"] == "ran"
    for name in GPU_STEPS:
        step = by_name[name]
        assert step["status"] == "skipped", step
        assert reason in step["reason"]
        assert step["seconds"] >= 0
    assert report["total_s"] <= report["budget_s"]


def test_dry_run_skips_every_gpu_step(tmp_path):
    rc, report = _run(tmp_path, "--dry-run")
    assert rc == 0
    _check(report, "dry run")


def test_without_cuda_every_gpu_step_has_its_reason():
    """What a plain run (no --dry-run) skips on a machine without CUDA, and why."""
    from benchmarks import gpu_check

    reasons = {s.name: gpu_check._skip_reason(s, False, False, 400.0) for s in gpu_check.steps()}
    assert reasons.pop("env") is None
    assert set(reasons) == GPU_STEPS
    assert all("no CUDA device" in r for r in reasons.values())
    # on a GPU machine: run, unless a tool is missing or the budget is spent
    step = next(s for s in gpu_check.steps() if s.name == "cuda_tests")
    assert gpu_check._skip_reason(step, True, False, 400.0) is None
    assert "too few" in gpu_check._skip_reason(step, True, False, 5.0)


def test_requires_cuda_marker_selects_the_cuda_tests():
    """``-m requires_cuda`` (the GPU step) selects the tests that skip without CUDA, not none."""
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "requires_cuda",
            "tests/ops/test_masked_embedding.py",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    ids = [ln for ln in p.stdout.splitlines() if "::" in ln]
    assert ids and all("cuda" in i for i in ids), p.stdout


def test_step_timeouts_fit_the_budget_and_the_lease():
    """Every step gets its whole timeout inside the budget, and the budget, the machine's start,
    the transfers and the idle time after it leave at least 3 minutes of a 15-minute lease."""
    from benchmarks import gpu_check

    assert sum(s.timeout_s for s in gpu_check.steps()) <= gpu_check.BUDGET_S
    lease = gpu_check.LEASE
    used = gpu_check.BUDGET_S + lease["start"] + lease["transfers"] + lease["idle_after"]
    assert lease["lease"] == 900 and lease["lease"] - used >= 180


def test_archive_and_what_to_commit(tmp_path):
    """``--archive`` packs the output directory; the last lines say what to commit and where."""
    out = tmp_path / "out"
    rc, _ = _run(out, "--dry-run", "--archive", str(out / "all.tar.gz"))
    assert rc == 0
    with tarfile.open(out / "all.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["gpu_check.json", "gpu_check.log"]
    from benchmarks import gpu_check

    (out / "train_step-nvidia-h200.json").write_text("[]\n")
    ran = [{"name": "env", "status": "ran"}, {"name": "bench_train_step", "status": "ran"}]
    advice = gpu_check.commit_advice(out, ran, str(out / "all.tar.gz"))
    assert "benchmarks/results/gpu/" in advice and "train_step-nvidia-h200.json" in advice
    assert "tar -xzf" in advice
    none = gpu_check.commit_advice(out, ran[:1], None)
    assert none.startswith("[gpu-check] nothing to commit")


@pytest.mark.parametrize("venv", [True, False])
def test_make_gpu_check_runs_the_venv_python_when_there(tmp_path, venv):
    """``make gpu-check`` runs ``VENV/bin/python`` where it exists, else ``$(PYTHON)``."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    vdir = tmp_path / "venv"
    if venv:
        (vdir / "bin").mkdir(parents=True)
        (vdir / "bin" / "python").write_text("#!/bin/sh\n")
    # under `make test` this make is a sub-make: without the outer MAKEFLAGS / MAKELEVEL it prints
    # no "Entering directory" lines and reads the variables given here alone
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    p = subprocess.run(
        ["make", "--no-print-directory", "-n", "gpu-check", f"VENV={vdir}",
         "PYTHON=sys-python", f"OUT={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=60, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    want = f"{vdir}/bin/python" if venv else "sys-python"
    assert p.stdout.startswith(f"{want} benchmarks/gpu_check.py --out {tmp_path}"), p.stdout
