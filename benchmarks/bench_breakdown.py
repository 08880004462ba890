"""Where one AimKP training step spends its time: a breakdown by phase, next to the whole step.

Phases (ms, of the median repeat, and share of their sum), measured on the real code path
(:mod:`phases`: wrapped functions and module hooks, no re-implementation):

``collate``, ``embedding_masking``, ``vision_tower``, ``projector``, ``language_model``,
``head_loss`` (lm_head + cross-entropy), ``backward`` (autograd of a plain backward over the same
rows), ``engine_hooks`` (per-row gradient norms / cosines: the AimKP step's backward minus the
plain backward over the same rows and layout, measured in the same repeat: BY DIFFERENCE),
``filter_reweight`` (engine enter / exit, ``gf.decide``, ``gram.reweight``) and ``optimizer``
(gradient clipping + AdamW step + zero_grad, as ``aimkp.train.epoch.optimizer_step``).

``total_ms`` is the uninstrumented ``aimkp_step`` + optimizer step timed on its own, in the same
repeats (interleaved); ``phases_sum_ms / total_ms`` says how well the phases account for it.
On CUDA the row also carries tokens/s and the model FLOP utilisation: ``6 x N x T`` (N the
language model's parameters, T the kept tokens of every row; the usual dense-training
convention: with a frozen base the backward skips the weight gradients, so the matmul work done
is nearer 4 N T) plus ``2 x N_vision x image tokens`` (the frozen tower, forward only), over the
device's dense bf16 peak.

Usage::

    python -m benchmarks.bench_breakdown [--quick] [--device cpu|cuda] [--trace FILE]
    python -m benchmarks.bench_breakdown --device cuda --shape qwen2vl7b
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
from typing import Any

import torch

from benchmarks.common import (
    env_info,
    print_table,
    resolve_shape,
    save_figure,
    step_parser,
    sync,
    write_results,
)
from benchmarks.phases import Spans, instrumented, step_phases
from benchmarks.workload import (
    Workload,
    build_workload,
    image_tokens,
    run_aimkp,
    run_token_floor,
    step_facts,
)

# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name
ORDER = [
    "collate", "embedding_masking", "vision_tower", "projector", "language_model", "head_loss",
    "backward", "engine_hooks", "filter_reweight", "optimizer",
]  # fmt: skip
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def make_optimizer_step(w: Workload) -> Any:
    """``clip_grad_norm_`` (1.0) + AdamW step + ``zero_grad`` on the trainable parameters (the
    loop's ``optimizer_step`` without the rank all-reduce and the schedule)."""
    params = w.params
    opt = torch.optim.AdamW(params, lr=1e-6)

    def run() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def _timed(fn: Any, device: str) -> float:
    spans = Spans(device)
    spans.start("all")
    fn()
    spans.stop("all")
    return spans.totals()["all"]


def one_repeat(w: Workload, opt_step: Any) -> dict[str, float]:
    """One interleaved repeat: instrumented plain floor, instrumented AimKP step + optimizer,
    uninstrumented AimKP step + optimizer. Returns the phases and totals (ms)."""
    with instrumented(w.loaded, Spans(w.device)) as spans:
        run_token_floor(w)
    plain = step_phases(spans.totals())
    with instrumented(w.loaded, Spans(w.device)) as spans:
        run_aimkp(w)
        spans.start("optimizer")
        opt_step()
        spans.stop("optimizer")
    totals = spans.totals()
    phases = step_phases(totals)
    phases["engine_hooks"] = phases["backward"] - plain["backward"]
    phases["backward"] = plain["backward"]
    phases["optimizer"] = totals["optimizer"]
    phases = {k: phases[k] for k in ORDER}
    total = _timed(lambda: (run_aimkp(w), opt_step()), w.device)
    return {**phases, "_total": total, "_instrumented": totals["step"] + totals["optimizer"]}


def flops_per_step(w: Workload, tokens: int, image_tokens: int) -> float:
    """``6 N T + 2 N_vision I`` (module docstring)."""
    n_lm = sum(p.numel() for p in w.loaded.adapter.language_model.parameters())
    n_vis = sum(p.numel() for p in w.loaded.adapter.vision_tower.parameters())
    return 6.0 * n_lm * tokens + 2.0 * n_vis * image_tokens


def gpu_figures(w: Workload, total_ms: float, tokens: int) -> dict[str, Any]:
    """tokens/s and model FLOP utilisation (CUDA only; None elsewhere)."""
    if not w.device.startswith("cuda"):
        return {"mfu": None, "flops_per_step": None, "peak_flops": None}
    n_image = sum(image_tokens(s) for s in w.samples)
    flops = flops_per_step(w, tokens, n_image)
    name = torch.cuda.get_device_name(w.device)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = flops / (total_ms / 1e3) / peak if peak else None
    return {"mfu": mfu, "flops_per_step": flops, "peak_flops": peak}


def breakdown_row(w: Workload, repeats: list[dict[str, float]], config: str) -> dict[str, Any]:
    """The row: the phases of the median repeat, their shares, the total measured on its own,
    spreads. The median repeat is the one whose instrumented step is the median: its phases
    add up to one real step (per-phase medians taken across repeats need not, on a loaded
    machine); ``phase_min_ms`` / ``phase_max_ms`` give each phase's spread over the repeats."""
    names = [k for k in repeats[0] if not k.startswith("_")]
    ranked = sorted(repeats, key=lambda r: r["_instrumented"])
    phases = {k: ranked[(len(ranked) - 1) // 2][k] for k in names}
    totals = [r["_total"] for r in repeats]
    total = statistics.median(totals)
    phase_sum = sum(phases.values())
    facts = step_facts(w)
    tokens = facts["input_tokens"]
    return {
        **env_info(w.device),
        "benchmark": "breakdown",
        "config": config,
        "model": w.shape,
        **facts,
        "phases": phases,
        "shares": {k: v / phase_sum for k, v in phases.items()},
        "phase_min_ms": {k: min(r[k] for r in repeats) for k in names},
        "phase_max_ms": {k: max(r[k] for r in repeats) for k in names},
        "phases_sum_ms": phase_sum,
        "total_ms": total,
        "total_min_ms": min(totals),
        "total_max_ms": max(totals),
        "instrumented_total_ms": statistics.median(r["_instrumented"] for r in repeats),
        "sum_over_total": phase_sum / total,
        "repeats": len(repeats),
        "engine_split": "by difference: AimKP backward - plain backward over the same rows",
        "tokens_per_s": tokens / (total / 1e3),
        **gpu_figures(w, total, tokens),
    }


def export_trace(w: Workload, opt_step: Any, path: pathlib.Path) -> None:
    """A ``torch.profiler`` Chrome trace of one AimKP step + optimizer step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if w.device.startswith("cuda") else [])
    with profile(activities=acts, record_shapes=True) as prof:
        run_aimkp(w)
        opt_step()
        sync(w.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    print(f"wrote trace {path}")


def plot_breakdown(row: dict[str, Any], out_dir: pathlib.Path) -> pathlib.Path:
    """One horizontal bar per phase (ms), the measured total as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(row["phases"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(names, [row["phases"][k] for k in names])
    for i, k in enumerate(names):
        ax.text(row["phases"][k], i, f" {100 * row['shares'][k]:.0f}%", va="center", fontsize=8)
    ax.set_xlabel(
        f"ms (phases sum {row['phases_sum_ms']:.1f}, step measured alone {row['total_ms']:.1f})"
    )
    ax.invert_yaxis()
    ax.set_title(
        f"AimKP step by phase: {row['model']}\n{row['device']} · {row['commit']}", fontsize=9
    )
    return save_figure(fig, out_dir, f"breakdown-{row['config']}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = step_parser(__doc__, "B=4, 7 repeats")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--trace", type=pathlib.Path, default=None, help="torch.profiler trace file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    size, config = resolve_shape(args)
    big = size != "tiny"
    batch = args.batch_size or (4 if args.quick or not big else 8)
    w = build_workload(
        size, device=args.device, batch_size=batch, lora_rank=128 if big else 16,
        layers=args.layers, vision_layers=args.layers,
    )  # fmt: skip
    opt_step = make_optimizer_step(w)
    for _ in range(2):  # warm-up (allocator, kernels, optimizer state)
        one_repeat(w, opt_step)
    repeats = [one_repeat(w, opt_step) for _ in range(7 if args.quick else 15)]
    row = breakdown_row(w, repeats, config)
    print(f"\n{row['model']}; {row['device']}; B={batch}, {row['rows']} rows")
    table = [{"phase": k, "ms": v, "share": row["shares"][k]} for k, v in row["phases"].items()]
    print_table(
        table + [{"phase": "sum", "ms": row["phases_sum_ms"], "share": 1.0}],
        ["phase", "ms", "share"],
    )
    print(
        f"step measured alone: {row['total_ms']:.2f} ms; phases / total {row['sum_over_total']:.3f}"
    )
    if args.trace:
        export_trace(w, opt_step, args.trace)
    if not args.no_write:
        for p in write_results(f"breakdown-{config}", [row], args.output):
            print(f"wrote {p}")
        print(f"wrote {plot_breakdown(row, args.output / 'plots')}")
    return [row]


if __name__ == "__main__":
    main()
