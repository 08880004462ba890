"""Run the benchmarks: where aimkp's training time goes and whether it speeds training up.

aimkp bench [masked-embedding|grad-gram|train-step|breakdown|scaling|all] [--quick]
            [--device cpu|cuda] [--output DIR] [--trace FILE]
            [--shape auto|tiny|llava7b|qwen2vl7b|7b]

The benchmarks are the scripts in the repository's ``benchmarks/`` folder, not part of the
installed package (they write result files and plots into the checkout, need matplotlib and
build the 7B-shaped models from configs; a wheel stays without them). ``aimkp bench`` finds the
folder at ``$AIMKP_BENCHMARKS``, beside the ``aimkp`` package of a source checkout (``pip install
-e .``, the Makefile's set-up) or in the working directory (a checkout whose aimkp was installed
without ``-e``); without any it says so in one line (exit 2).
Results: ``benchmarks/results/`` (``results/quick/`` with ``--quick``) or ``--output``;
``benchmarks/results/README.md`` explains every file and the targets.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
from types import ModuleType

from aimkp.cli._common import check_device, check_output_dir, check_output_file
from aimkp.errors import UsageError

HELP = "run the benchmarks (step breakdown, scaling, kernels) of a source checkout"
NAMES = ["masked-embedding", "grad-gram", "train-step", "breakdown", "scaling", "all"]
# benchmarks/runner.py's SHAPES, written out so that parsing the command imports no torch
SHAPE_CHOICES = ["auto", "tiny", "llava7b", "qwen2vl7b", "7b"]


def benchmarks_dir() -> pathlib.Path:
    """The ``benchmarks/`` folder: ``$AIMKP_BENCHMARKS`` or the checkout's beside ``aimkp/``."""
    env = os.environ.get("AIMKP_BENCHMARKS")
    if env:
        folder = pathlib.Path(env)
        if not (folder / "runner.py").is_file():
            raise UsageError(
                f"AIMKP_BENCHMARKS={env}: no runner.py there (not a benchmarks/ folder)"
            )
        return folder
    import aimkp

    # beside the package (pip install -e .), then the working directory: a checkout whose
    # aimkp was installed without -e runs `aimkp bench` as it runs `python -m benchmarks`
    beside = pathlib.Path(aimkp.__file__).resolve().parents[1] / "benchmarks"
    for folder in (beside, pathlib.Path.cwd() / "benchmarks"):
        if (folder / "runner.py").is_file():
            return folder
    raise UsageError(
        "no benchmarks/ folder beside this aimkp install (an installed wheel does not ship "
        "them) nor in the working directory: run `aimkp bench` in a source checkout, or set "
        "AIMKP_BENCHMARKS to a checkout's benchmarks/ folder"
    )


def load_runner(folder: pathlib.Path) -> ModuleType:
    """Import ``folder`` as the package ``benchmarks`` (its modules import each other as
    ``benchmarks.*``; opacus installs a ``benchmarks`` package of its own, which this one
    replaces in ``sys.modules``) and return its ``runner`` module."""
    spec = importlib.util.spec_from_file_location(
        "benchmarks", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise UsageError(f"{folder}: cannot import it as the benchmarks package")
    package = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("benchmarks.runner")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", nargs="?", choices=NAMES, default="all", help="what to run")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--output", default=None, help="results directory")
    parser.add_argument("--trace", default=None, help="breakdown: torch.profiler trace file")
    parser.add_argument(
        "--shape",
        choices=SHAPE_CHOICES,
        default="auto",
        help="model of train-step / breakdown / scaling: auto = tiny preset on the CPU, "
        "LLaVA-1.5-7B shapes (few layers) on a GPU; qwen2vl7b = Qwen2-VL-7B shapes; 7b = "
        "each 7B shape in turn",
    )


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    if args.output is not None:
        check_output_dir(args.output, "--output")
    if args.trace is not None:
        check_output_file(args.trace, "--trace")
    runner = load_runner(benchmarks_dir())
    return runner.run(
        args.benchmark,
        quick=args.quick,
        device=device,
        output=pathlib.Path(args.output) if args.output else None,
        trace=pathlib.Path(args.trace).resolve() if args.trace else None,
        shape=args.shape,
    )
