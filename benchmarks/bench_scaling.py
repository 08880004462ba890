"""How the AimKP step's time and memory grow: against batch size, text length, image tokens and
LoRA rank, next to the plain fine-tuning step on the same samples.

Per axis, every other knob stays at its base value (B=4, text as in the data, the preset's
image size, LoRA r=16 on the CPU; B=8, r=128 at a 7B shape on a GPU, ``--shape llava7b`` or
``qwen2vl7b``). Steps: ``aimkp``
(``aimkp_step``, strides 2/2: every copy present), ``token-floor`` (a plain forward + backward
over the same rows, no engine) and ``sft`` (the plain step on the originals). Each point: median,
min and max ms over repeats and the peak memory of one step (CUDA allocator peak; on the CPU the
profiler's tensor-memory timeline).

Fit per (axis, step): ``time = c * x ** time_exponent`` and the same for memory, by least squares
in log-log space (:func:`fit.loglog_fit`), stored with their R^2 in rows ``kind="fit"`` and
printed. x: ``batch`` samples, ``text_tokens`` (mean tokens of an original row minus its image
tokens), ``image_tokens`` per image, ``lora_rank``.

Usage::

    python -m benchmarks.bench_scaling [--quick] [--device cpu|cuda] [--axes batch,lora_rank]
    python -m benchmarks.bench_scaling --device cuda --shape qwen2vl7b --axes image_tokens
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Callable
from typing import Any

from benchmarks.common import (
    env_info,
    peak_memory_mb,
    print_table,
    resolve_shape,
    save_figure,
    step_parser,
    time_fn,
    write_results,
)
from benchmarks.fit import loglog_fit
from benchmarks.workload import (
    Workload,
    build_workload,
    image_tokens,
    run_aimkp,
    run_sft,
    run_token_floor,
    step_facts,
)

STEPS: dict[str, Callable[[Workload], Any]] = {
    "aimkp": run_aimkp,
    "token-floor": run_token_floor,
    "sft": run_sft,
}
# axis -> build_workload keyword -> (quick values, full values) on the CPU
AXES_CPU: dict[str, tuple[str, list[int], list[int]]] = {
    "batch": ("batch_size", [1, 2, 4], [1, 2, 4, 8, 16]),
    "text_tokens": ("text_repeat", [1, 8, 32], [1, 4, 16, 64]),
    "image_tokens": ("image_px", [32, 64, 96], [32, 64, 96, 128]),
    "lora_rank": ("lora_rank", [4, 16, 64], [4, 8, 16, 32, 64, 128]),
}
# 7B shapes: image sides are multiples of 28 (CLIP's patch 14; Qwen2-VL's patch 14 x merge 2):
# 256 / 576 / 1024 / 1600 image tokens for LLaVA, 64 / 144 / 256 / 400 for Qwen2-VL
AXES_GPU: dict[str, tuple[str, list[int], list[int]]] = {
    "batch": ("batch_size", [1, 2, 4], [1, 2, 4, 8]),
    "text_tokens": ("text_repeat", [1, 8, 32], [1, 4, 16, 64]),
    "image_tokens": ("image_px", [224, 336, 448], [224, 336, 448, 560]),
    "lora_rank": ("lora_rank", [16, 64, 128], [16, 32, 64, 128, 256]),
}


def axis_x(axis: str, w: Workload, value: int) -> float:
    """The x of a point: the knob, or the token count it produced."""
    if axis == "text_tokens":
        kept = [int(s.input_ids.numel()) - image_tokens(s) for s in w.samples]
        return sum(kept) / len(kept)
    if axis == "image_tokens":
        return float(image_tokens(w.samples[0]))
    return float(value)


def measure_point(w: Workload, axis: str, value: int, reps: int) -> list[dict[str, Any]]:
    """Time and peak memory of every step at one point (one row per step)."""
    x = axis_x(axis, w, value)
    facts = step_facts(w)
    rows = []
    for name, fn in STEPS.items():
        t = time_fn(lambda fn=fn: fn(w), w.device, warmup=1, rep=reps)
        mem = peak_memory_mb(lambda fn=fn: fn(w), w.device)
        rows.append(
            {"kind": "point", "axis": axis, "x": x, "value": value, "step": name, **t,
             "peak_mem_mb": mem, "model": w.shape, **facts}
        )  # fmt: skip
    return rows


def fit_rows(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``kind="fit"`` row per (axis, step): time and memory exponents with R^2."""
    out = []
    for axis in dict.fromkeys(p["axis"] for p in points):
        for step in STEPS:
            series = [p for p in points if p["axis"] == axis and p["step"] == step]
            xs = [p["x"] for p in series]
            ft = loglog_fit(xs, [p["median_ms"] for p in series])
            fm = loglog_fit(xs, [p["peak_mem_mb"] or 0.0 for p in series])
            out.append(
                {"kind": "fit", "axis": axis, "step": step, "points": len(series),
                 "time_exponent": ft["exponent"], "time_r2": ft["r2"],
                 "memory_exponent": fm["exponent"], "memory_r2": fm["r2"]}
            )  # fmt: skip
    return out


def plot_axis(rows: list[dict[str, Any]], axis: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Log-log time and memory of every step against one axis, exponents in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (at, am) = plt.subplots(1, 2, figsize=(10, 4))
    for f in (r for r in rows if r["kind"] == "fit" and r["axis"] == axis):
        pts = [
            r for r in rows if r["kind"] == "point" and r["axis"] == axis and r["step"] == f["step"]
        ]
        xs = [p["x"] for p in pts]
        te, me = f["time_exponent"], f["memory_exponent"]
        at.plot(xs, [p["median_ms"] for p in pts], "o-", label=f"{f['step']} (k={te:.2f})")
        if me is not None:
            am.plot(xs, [p["peak_mem_mb"] for p in pts], "o-", label=f"{f['step']} (k={me:.2f})")
    for ax, label in ((at, "median ms"), (am, "peak MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(axis)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"scaling vs {axis}: {r0['model']}\n{r0['device']} · {r0['commit']}", fontsize=9)
    return save_figure(fig, out_dir, f"scaling-{r0['config']}-{axis}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = step_parser(__doc__, "3 points per axis, 3 repeats")
    ap.add_argument("--axes", default=None, help="comma-separated subset of the axes")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    size, config = resolve_shape(args)
    big = size != "tiny"
    axes = AXES_GPU if big else AXES_CPU
    wanted = args.axes.split(",") if args.axes else list(axes)
    unknown = [a for a in wanted if a not in axes]
    if unknown:
        raise SystemExit(f"bench_scaling: unknown axes {unknown} (choose from {list(axes)})")
    base = {"batch_size": 8 if big else 4, "lora_rank": 128 if big else 16}
    env = env_info(args.device)
    points: list[dict[str, Any]] = []
    for axis in wanted:
        knob, quick, full = axes[axis]
        for value in quick if args.quick else full:
            w = build_workload(
                size, device=args.device, layers=args.layers,
                vision_layers=args.layers, **{**base, knob: value},
            )  # fmt: skip
            points += measure_point(w, axis, value, reps=3 if args.quick else 7)
            del w
    fits = fit_rows(points)
    rows = [{**env, "benchmark": "scaling", "config": config, **r} for r in points + fits]
    print_table(
        [r for r in rows if r["kind"] == "point"], ["axis", "x", "step", "median_ms", "peak_mem_mb"]
    )
    print()
    print_table(fits, ["axis", "step", "time_exponent", "time_r2", "memory_exponent", "memory_r2"])
    if not args.no_write:
        for p in write_results(f"scaling-{config}", rows, args.output):
            print(f"wrote {p}")
        for axis in wanted:
            print(f"wrote {plot_axis(rows, axis, args.output / 'plots')}")
    return rows


if __name__ == "__main__":
    main()
