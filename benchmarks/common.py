"""Shared helpers for the benchmarks: timing, memory, environment rows, result files, tables.

Every row a benchmark writes carries the device name, library versions and the commit, so a
number can always be traced back to what produced it.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from aimkp.models.shapes import SHAPES

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _version(mod: str) -> str | None:
    try:
        module = __import__(mod)
    except Exception:
        return None
    return getattr(module, "__version__", None)


def env_info(device: torch.device | str) -> dict[str, Any]:
    """Device, versions, commit and time for the rows of one benchmark run."""
    try:
        commit = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=pathlib.Path(__file__).parent,
            stderr=subprocess.DEVNULL,
            text=True,
        ).strip()
    except Exception:
        commit = "unknown"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    device: torch.device | str,
    warmup: int = 3,
    rep: int = 10,
    min_time_s: float = 0.0,
) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn`` over ``rep`` runs after ``warmup`` runs.

    CUDA: events around each run. CPU: perf_counter with the call fully synchronous.
    Keeps repeating until ``min_time_s`` seconds have been spent timing (at least ``rep`` runs).
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < rep or spent < min_time_s:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms / 1e3
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "runs": len(times),
    }


def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str) -> float | None:
    """Peak device memory (MiB) allocated while ``fn`` runs, above what was live before.

    On CUDA this is torch's allocator peak. On the CPU (no allocator counter) it is the peak of
    the tensor-memory timeline the PyTorch profiler records for one run of ``fn``
    (``profile_memory``): every CPU tensor allocated and freed during the run, nothing that was
    live before it; None if the profiler cannot produce the timeline.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu_peak_mb(fn)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _cpu_peak_mb(fn: Callable[[], Any]) -> float | None:
    import json
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof:
            fn()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "timeline.json")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # still the CPU-capable API
                prof.export_memory_timeline(path, device="cpu")
            with open(path) as f:
                _, sizes = json.load(f)
    except Exception as exc:  # noqa: BLE001 - a missing number, never a failed benchmark
        print(f"(CPU peak memory not measured: {type(exc).__name__}: {exc})")
        return None
    return max((sum(s) for s in sizes), default=0) / 2**20


def results_dir() -> pathlib.Path:
    """Where result files go: ``$AIMKP_BENCH_OUT`` (set by the runner) or benchmarks/results."""
    return pathlib.Path(os.environ.get("AIMKP_BENCH_OUT", RESULTS))


def write_results(
    name: str, rows: list[dict[str, Any]], out_dir: pathlib.Path | None = None
) -> list[pathlib.Path]:
    """Write rows as ``<name>-<device-slug>.json`` and ``.csv`` under benchmarks/results/."""
    out_dir = pathlib.Path(out_dir or results_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = rows[0].get("device", "unknown") if rows else "unknown"
    slug = "".join(c if c.isalnum() else "-" for c in dev.split(" (")[0].lower()).strip("-")
    jpath = out_dir / f"{name}-{slug}.json"
    cpath = out_dir / f"{name}-{slug}.csv"
    jpath.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every row's columns, first-seen order
    with cpath.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return [jpath, cpath]


def save_figure(fig: Any, out_dir: pathlib.Path, stem: str) -> pathlib.Path:
    """Lay out, write ``out_dir/<stem>.png`` (110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{stem}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def step_parser(description: str | None, quick_help: str) -> argparse.ArgumentParser:
    """The parser of the benchmarks built on :mod:`workload` (breakdown, scaling): ``--quick``,
    ``--device``, ``--shape``, ``--layers``, ``--output`` (default :func:`results_dir`),
    ``--no-write``."""
    raw = argparse.RawTextHelpFormatter  # the module docstrings are the --help text
    ap = argparse.ArgumentParser(description=description, formatter_class=raw)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--shape",
        choices=["auto", "tiny", *SHAPES],
        default="auto",
        help="model: tiny preset (auto on the CPU) or a 7B shape with --layers layers "
        "(llava7b: auto on CUDA)",
    )
    ap.add_argument("--layers", type=int, default=2, help="decoder and vision layers (7B shapes)")
    ap.add_argument("--output", type=pathlib.Path, default=results_dir(), help="results directory")
    ap.add_argument("--no-write", action="store_true")
    return ap


def resolve_shape(args: Any) -> tuple[str, str]:
    """``(shape, config)`` of ``--shape`` / ``--device``: ``auto`` is ``tiny`` on the CPU and
    ``llava7b`` on CUDA; ``config`` (``cpu-tiny``, ``gpu-<shape>``) names the result files."""
    shape = args.shape
    if shape == "auto":
        shape = "llava7b" if args.device.startswith("cuda") else "tiny"
    return shape, "cpu-tiny" if shape == "tiny" else f"gpu-{shape}"


def print_table(rows: Iterable[dict[str, Any]], cols: list[str]) -> None:
    rows = list(rows)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
