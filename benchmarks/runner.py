"""The benchmarks' one entry point: ``aimkp bench NAME`` and ``python -m benchmarks NAME``.

``NAME``: ``masked-embedding``, ``grad-gram``, ``train-step``, ``breakdown``, ``scaling`` or
``all`` (every one, in that order). Each benchmark runs as its own script in a child process
(one failing, or running out of memory, does not take the others down; they keep their own
command lines for direct use) with ``AIMKP_BENCH_OUT`` set to the output directory, where it
writes ``<name>-<device>.json`` (+ ``.csv``); the PNGs go to ``OUTPUT/plots/``. Exit status:
0 when every benchmark ran, 1 when one failed (the others still run).

``--quick`` runs each at its small size (seconds to a few minutes on a CPU); ``--device`` picks
the device (default: CUDA when available); ``--shape`` the model of the train-step, breakdown
and scaling benchmarks: ``auto`` (default) is the tiny preset on the CPU and LLaVA-1.5-7B shapes
with a few layers on a GPU, ``qwen2vl7b`` Qwen2-VL-7B shapes (``aimkp.models.shapes``), ``7b``
each 7B shape in turn.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

from aimkp.models.shapes import SHAPES as MODEL_SHAPES

HERE = pathlib.Path(__file__).resolve().parent
# name -> (script, arguments it always gets)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "masked-embedding": ("bench_masked_embedding.py", []),
    "grad-gram": ("bench_grad_gram.py", []),
    "train-step": ("bench_train_step.py", []),
    "breakdown": ("bench_breakdown.py", []),
    "scaling": ("bench_scaling.py", []),
}
CHOICES = [*BENCHMARKS, "all"]
SHAPES = ["auto", "tiny", *MODEL_SHAPES, "7b"]  # 7b: every 7B shape, one run each
STEP_BENCHMARKS = ("train-step", "breakdown", "scaling")  # the ones taking a model shape


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``aimkp bench`` / ``python -m benchmarks``."""
    ap.add_argument("benchmark", nargs="?", choices=CHOICES, default="all", help="what to run")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument(
        "--output",
        type=pathlib.Path,
        default=None,
        help="results directory (default: benchmarks/results, benchmarks/results/quick with "
        "--quick, so quick runs never overwrite the full-size results)",
    )
    ap.add_argument("--trace", type=pathlib.Path, default=None, help="breakdown: profiler trace")
    ap.add_argument("--shape", choices=SHAPES, default="auto", help="model of the step benchmarks")


def default_output(quick: bool) -> pathlib.Path:
    """``$AIMKP_BENCH_OUT`` (``make gpu-check``'s DIR), else ``benchmarks/results`` (full
    sizes) or ``benchmarks/results/quick``."""
    if os.environ.get("AIMKP_BENCH_OUT"):
        return pathlib.Path(os.environ["AIMKP_BENCH_OUT"])
    return HERE / "results" / "quick" if quick else HERE / "results"


def command(
    name: str,
    quick: bool,
    device: str | None,
    trace: pathlib.Path | None,
    shape: str = "auto",
) -> list[str]:
    """The child command line of one benchmark."""
    script, extra = BENCHMARKS[name]
    cmd = [sys.executable, "-m", f"benchmarks.{pathlib.Path(script).stem}", *extra]
    if quick:
        cmd.append("--quick")
    if device:
        cmd += ["--device", device]
    if trace is not None and name == "breakdown":
        cmd += ["--trace", str(trace)]
    if shape != "auto" and name in STEP_BENCHMARKS:
        if name == "train-step":  # its --config names the shape with the device kind
            cmd += ["--config", "cpu-tiny" if shape == "tiny" else f"gpu-{shape}"]
        else:
            cmd += ["--shape", shape]
    return cmd


def shapes_of(name: str, shape: str) -> list[str]:
    """The shapes benchmark ``name`` runs at: ``7b`` expands to every 7B shape for the step
    benchmarks (their result files are named by shape, so the runs do not overwrite each
    other); the others take no shape."""
    if shape == "7b" and name in STEP_BENCHMARKS:
        return list(MODEL_SHAPES)
    return ["auto" if shape == "7b" else shape]


def run_one(name: str, cmd: list[str], output: pathlib.Path) -> bool:
    """Run one benchmark's script; True when it exited 0."""
    print(f"== aimkp bench {name}: {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "AIMKP_BENCH_OUT": str(output)}
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=env, cwd=HERE.parent)  # -m finds this checkout's benchmarks
    status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    print(f"== {name}: {status} in {time.perf_counter() - t0:.0f} s", flush=True)
    return rc == 0


def run(
    benchmark: str,
    *,
    quick: bool = False,
    device: str | None = None,
    output: pathlib.Path | None = None,
    trace: pathlib.Path | None = None,
    shape: str = "auto",
) -> int:
    """Run ``benchmark`` (or ``all``) into ``output``, then draw the plots; 0 if all ran."""
    from benchmarks import plot

    names = list(BENCHMARKS) if benchmark == "all" else [benchmark]
    output = pathlib.Path(output or default_output(quick)).resolve()
    output.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        for one in shapes_of(name, shape):
            label = name if one == shape else f"{name} ({one})"
            if not run_one(label, command(name, quick, device, trace, one), output):
                failed.append(label)
    plot.main(["--results", str(output), "--out", str(output / "plots")])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    return run(
        args.benchmark, quick=args.quick, device=args.device, output=args.output,
        trace=args.trace, shape=args.shape,
    )  # fmt: skip
