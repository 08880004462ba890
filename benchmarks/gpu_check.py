"""Everything a GPU can show about aimkp, in one command (``make gpu-check OUT=DIR``).

Steps, each with its own timeout; the timeouts sum to the run's budget (``BUDGET_S``, 510 s), so
every step gets its whole time and the run fits a 15-minute device lease with room to spare
(:data:`LEASE`: the machine's start, the transfers and the idle minute after the run counted in):

1. ``env``          the python running the check, versions, the device;
2. ``wheels``       carried wheels for what the GPU machine lacks (``make gpu-wheels`` fills the
                    ignored ``.whl/``: nltk, opacus) installed into ``/tmp/site`` (``PYTHONPATH``
                    of every later step);
3. ``install``      ``pip install --no-deps --no-build-isolation .`` with the CUDA sources built
                    for sm_90 only (``AIMKP_CUDA_ARCHS=90``, ``MAX_JOBS=16``); the built
                    extension is copied into the checkout so the tests import it;
4. ``cuda_tests``   the CUDA-only tests (``-m requires_cuda``);
5. ``bench_masked_embedding``, ``bench_grad_gram``, ``bench_train_step`` (LLaVA-1.5-7B
                    shapes), ``bench_breakdown`` (``python -m benchmarks breakdown --quick``:
                    the step by phase, MFU), ``bench_train_step_qwen2vl7b`` (Qwen2-VL-7B shapes),
                    ``memory_plan``: the benchmarks at their GPU configurations (7B-shaped, few
                    layers), result files written into DIR (``AIMKP_BENCH_OUT``);
6. ``sanitizer``    a short subset of the CUDA kernel tests under ``compute-sanitizer --tool
                    memcheck``.

``DIR/gpu_check.json``: ``{"device", "budget_s", "total_s", "steps": [{"name", "status"
(ran | skipped | failed), "seconds", "reason"}]}``; each step's output goes to
``DIR/gpu_check.log``. Without CUDA (or with ``--dry-run``) every GPU step is ``skipped`` with its
reason and the command exits 0; on a GPU it exits 1 when a step failed. It ends by printing the
files to commit and where (``benchmarks/results/gpu/``); ``--archive FILE`` also packs DIR into one
``.tar.gz`` (a machine that hands back few files returns that one).

Usage::

    python benchmarks/gpu_check.py --out DIR [--dry-run] [--budget-s 510] [--archive FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
SITE = "/tmp/site"
PY = sys.executable
RESULTS = "benchmarks/results/gpu"  # where a GPU run's files are committed
# the kernel tests that run under compute-sanitizer: the CUDA C++ masked-embedding op, forward
# and backward, both layouts (a few seconds natively; memcheck slows CUDA code 10-100x)
SANITIZER_TESTS = ["tests/ops/test_masked_embedding.py", "-m", "requires_cuda", "-k", "cuda"]

# One device lease (s): what a run of this script may take of it. The machine's start ("a minute
# or more"), the working tree's and the results' transfers, and the idle time before the machine
# is given back are the lease's too; at least SPARE_S stays unused (a rerun of a failed step).
LEASE = {"lease": 900, "spare": 180, "start": 120, "transfers": 60, "idle_after": 30}
BUDGET_S = (
    LEASE["lease"] - LEASE["spare"] - LEASE["start"] - LEASE["transfers"] - LEASE["idle_after"]
)


@dataclasses.dataclass
class Step:
    """One check: a command (or a callable building it), its timeout and whether it needs CUDA."""

    name: str
    timeout_s: int
    command: Callable[[], list[str] | None]
    needs_cuda: bool = True
    needs: str | None = None  # an executable that must be on PATH


def _pytest(*args: str) -> list[str]:
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]


def _bench(script: str, *args: str) -> list[str]:
    # run from REPO (Step's cwd) as a module: the scripts import their siblings as benchmarks.*
    return [PY, "-m", f"benchmarks.{pathlib.Path(script).stem}", *args]


def _wheels() -> list[str] | None:
    wheels = sorted(glob.glob(str(REPO / ".whl" / "*.whl")))
    if not wheels:
        return None  # nothing carried: skipped
    return [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--upgrade", "--target", SITE, *wheels]  # fmt: skip


def _install() -> list[str]:
    # pip builds in a temporary copy; the extension it installed is then copied beside the
    # checkout's sources (which tests and benchmarks import first)
    copy = (
        "import importlib.util, shutil, os; "
        "spec = importlib.util.find_spec('aimkp._C'); "
        f"dst = os.path.join({str(REPO / 'aimkp')!r}, os.path.basename(spec.origin)); "
        "same = os.path.exists(dst) and os.path.samefile(spec.origin, dst); "
        "same or shutil.copy2(spec.origin, dst); print('extension:', spec.origin)"
    )
    return ["bash", "-c",
            f"{PY} -m pip install -q --no-deps --no-build-isolation {REPO} && "
            f"cd /tmp && {PY} -c \"{copy}\""]  # fmt: skip


def _train_step(config: str) -> list[str]:
    """bench_train_step at a 7B shape with 2 decoder and 2 vision layers, compact rows."""
    return _bench(
        "bench_train_step.py", "--config", config, "--layers", "2", "--vision-layers", "2",
        "--quick", "--mask-mode", "compact",
    )  # fmt: skip


def steps() -> list[Step]:
    """The checks in order, most informative first. Their timeouts sum to :data:`BUDGET_S`
    (tested); each is what the step needs on one H100 / H200 with room for a cold start (the
    first import of torch, the first CUDA context, Triton's first compiles), and a step that
    outruns it is stopped, reported failed, and the next one starts."""
    return [
        Step("env", 30, lambda: [PY, "-c", _ENV], needs_cuda=False),
        Step("wheels", 15, _wheels),
        # the CUDA extension: 3 sources, sm_90 only, 16 compile jobs (~1.5 min)
        Step("install", 120, _install),
        Step("cuda_tests", 60, lambda: _pytest("-x", "-m", "requires_cuda", "tests")),
        Step(
            "bench_masked_embedding",
            30,
            lambda: _bench(
                "bench_masked_embedding.py",
                "--dtype",
                "bfloat16",
                "--rep",
                "20",
                "--providers",
                "aimkp,aimkp-cuda,eager",
            ),  # fmt: skip
        ),
        Step("bench_grad_gram", 35, lambda: _bench("bench_grad_gram.py", "--quick")),
        Step("bench_train_step", 55, lambda: _train_step("gpu-llava7b")),
        Step(
            "bench_breakdown",
            45,
            lambda: [PY, "-m", "benchmarks", "breakdown", "--quick", "--device", "cuda"],
        ),
        Step("bench_train_step_qwen2vl7b", 55, lambda: _train_step("gpu-qwen2vl7b")),
        Step(
            "memory_plan",
            30,
            lambda: _bench(
                "bench_train_step.py", "--config", "gpu-llava7b", "--memory-plan", "--samples", "2"
            ),  # fmt: skip
        ),
        Step(
            "sanitizer",
            35,
            lambda: [
                "compute-sanitizer",
                "--tool",
                "memcheck",
                "--error-exitcode",
                "3",
                *_pytest("-x", *SANITIZER_TESTS),
            ],  # fmt: skip
            needs="compute-sanitizer",
        ),
    ]


# the versions, also where torch is missing (a CPU checkout's system python): the GPU steps are
# then skipped, this one still says what ran it
_ENV = (
    "import platform, importlib.metadata as md, importlib.util, sys\n"
    "def v(n):\n"
    " try: return md.version(n)\n"
    " except md.PackageNotFoundError: return 'missing'\n"
    "print('python', platform.python_version(), 'torch', v('torch'), 'transformers', "
    "v('transformers'), 'triton', v('triton'), 'peft', v('peft'), 'nltk', v('nltk'), "
    "'opacus', v('opacus'))\n"
    "print('executable', sys.executable)\n"
    "if importlib.util.find_spec('torch') is None: print('torch missing: no GPU step can run')\n"
    "else:\n"
    " import torch\n"
    " print('cuda', torch.cuda.is_available(), torch.version.cuda)\n"
    " if torch.cuda.is_available(): print(torch.cuda.get_device_name(0))\n"
)


def _cuda_state() -> tuple[bool, str]:
    """(CUDA usable, why not): torch importable by this python and a device visible."""
    try:
        import torch
    except ImportError:
        return False, f"no CUDA device (torch is not importable by {PY})"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return True, ""


def _skip_reason(step: Step, cuda: bool, dry_run: bool, left: float, why: str = "") -> str | None:
    if step.needs_cuda and dry_run:
        return "dry run: GPU steps are not run"
    if step.needs_cuda and not cuda:
        return why or "no CUDA device (torch.cuda.is_available() is False)"
    if step.needs and shutil.which(step.needs) is None:
        return f"{step.needs} is not on PATH"
    if left < 10:
        return f"the {int(left)} s left of the budget are too few"
    return None


def run_step(step: Step, timeout: float, env: dict[str, str], log) -> tuple[str, str]:
    """(status, reason) of one command; its output appended to ``log``."""
    cmd = step.command()
    if cmd is None:
        return "skipped", "nothing to do (no carried wheels in .whl/)"
    log.write(f"\n===== {step.name}: {' '.join(cmd)}\n")
    log.flush()
    try:
        # its own process group, so a timeout also stops what it started (pip's compiler jobs)
        p = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    except OSError as exc:
        return "failed", f"could not start: {exc}"
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return "failed", f"timed out after {timeout:.0f} s"
    if rc != 0:
        return "failed", f"exit status {rc} (see gpu_check.log)"
    return "ran", ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for gpu_check.json, log, results")
    ap.add_argument("--dry-run", action="store_true", help="skip every GPU step (CPU check)")
    ap.add_argument("--budget-s", type=float, default=float(BUDGET_S), help="all steps together")
    ap.add_argument("--archive", help="also pack DIR into this .tar.gz at the end")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda, why = _cuda_state()
    env = dict(os.environ)
    env.update(
        AIMKP_BENCH_OUT=str(out.resolve()),
        AIMKP_CUDA_ARCHS="90",
        MAX_JOBS="16",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (SITE, env.get("PYTHONPATH", "")) if p),
    )
    t_start = time.perf_counter()
    results = []
    with (out / "gpu_check.log").open("w") as log:
        for step in steps():
            left = args.budget_s - (time.perf_counter() - t_start)
            t0 = time.perf_counter()
            reason = _skip_reason(step, cuda, args.dry_run, left, why)
            if reason is not None:
                status = "skipped"
            else:
                status, reason = run_step(step, min(step.timeout_s, left), env, log)
            seconds = round(time.perf_counter() - t0, 2)
            results.append(
                {"name": step.name, "status": status, "seconds": seconds, "reason": reason}
            )
            print(f"[gpu-check] {step.name}: {status} ({seconds:.0f} s) {reason}", flush=True)
    report = {
        "device": _device_name(cuda),
        "python": PY,
        "budget_s": args.budget_s,
        "total_s": round(time.perf_counter() - t_start, 2),
        "steps": results,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"[gpu-check] wrote {out / 'gpu_check.json'}")
    if args.archive:
        pack(out, pathlib.Path(args.archive))
        print(f"[gpu-check] packed {out} into {args.archive}")
    print(commit_advice(out, results, args.archive))
    failed = [r["name"] for r in results if r["status"] == "failed"]
    return 1 if failed and cuda and not args.dry_run else 0


def pack(out: pathlib.Path, archive: pathlib.Path) -> None:
    """``out``'s files (not the archive itself, when it lies inside) into one ``.tar.gz``."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(out.rglob("*")):
            if f.is_file() and f.resolve() != archive.resolve():
                tar.add(f, arcname=str(f.relative_to(out)))


def commit_advice(out: pathlib.Path, results: list[dict], archive: str | None) -> str:
    """What to commit after the run, and where (:data:`RESULTS`)."""
    ran = [r["name"] for r in results if r["status"] == "ran" and r["name"] != "env"]
    if not ran:
        return (
            "[gpu-check] nothing to commit: no GPU step ran (the reasons above); on a GPU "
            f"machine the result files go to {RESULTS}/"
        )
    files = sorted(f.name for f in out.iterdir() if f.is_file() and f.suffix in RESULT_SUFFIXES)
    source = f"tar -xzf {archive} -C {RESULTS}" if archive else f"cp {out}/* {RESULTS}/"
    return "\n".join([
        f"[gpu-check] to commit: these {len(files)} files into {RESULTS}/ (steps that ran: "
        f"{', '.join(ran)}):",
        *(f"  {f}" for f in files),
        f"  mkdir -p {RESULTS} && {source} && git add {RESULTS}",
        "  then the tables in docs/ that quote them (docs/memory-plan.md, benchmarks/results/"
        "README.md)",
    ])  # fmt: skip


RESULT_SUFFIXES = (".json", ".csv", ".log", ".png", ".md")


def _device_name(cuda: bool) -> str:
    if not cuda:
        return "no CUDA device"
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    sys.exit(main())
