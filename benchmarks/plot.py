"""Draw the committed benchmark results as bar charts (PNG), one figure per result file.

Usage: python benchmarks/plot.py [--results benchmarks/results] [--out benchmarks/results/plots]

Each figure shows, per configuration row, the metric that matches the benchmark's question:
masked_embedding -> ms per provider and mode; grad_gram -> time relative to the plain backward;
train_step -> samples/s per step kind; breakdown and scaling files are drawn by their own
benchmark (``bench_breakdown.plot_breakdown``, ``bench_scaling.plot_axis``). The device and
commit come from the rows themselves.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections import defaultdict
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent

# result-file prefix -> (group key(s), bar key, value key, y label, log scale)
SPECS: dict[str, tuple[tuple[str, ...], str, str, str, bool]] = {
    "masked_embedding": (("layout", "mode"), "provider", "ms", "median ms (lower is better)", True),
    "grad_gram": (("config",), "method", "x_plain", "time / plain backward", True),
    "train_step": (("config",), "step", "samples_per_s", "samples / s (higher is better)", False),
}


def _spec_for(path: pathlib.Path) -> tuple[tuple[str, ...], str, str, str, bool] | None:
    for prefix, spec in SPECS.items():
        if path.name.startswith(prefix):
            return spec
    return None


def plot_file(path: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path | None:
    """Plot one result JSON; returns the PNG path, or None when the file has no known layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import save_figure

    spec = _spec_for(path)
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not rows:
        return None
    if spec is None:
        return _own_plot(path, rows, out_dir)
    group_keys, bar_key, value_key, ylabel, log = spec
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.get(value_key) is None:
            continue
        group = " / ".join(str(r.get(k)) for k in group_keys)
        table[group][str(r.get(bar_key))] = float(r[value_key])
    groups = list(table)
    bars = sorted({b for g in table.values() for b in g})
    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(bars)) / 2), 4))
    for i, b in enumerate(bars):
        xs = [j + i * width for j, g in enumerate(groups) if b in table[g]]
        ys = [table[g][b] for g in groups if b in table[g]]
        ax.bar(xs, ys, width, label=b)
    ax.set_xticks([j + width * (len(bars) - 1) / 2 for j in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    r0 = rows[0]
    ax.set_title(f"{path.stem}\n{r0.get('device')} · torch {r0.get('torch')} · {r0.get('commit')}")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, f"{path.stem}")


def _own_plot(path: pathlib.Path, rows: list[dict[str, Any]], out_dir: pathlib.Path):
    """Breakdown and scaling results are drawn by their own benchmark's plot function."""
    if path.name.startswith("breakdown"):
        from benchmarks.bench_breakdown import plot_breakdown

        return [plot_breakdown(r, out_dir) for r in rows][-1]
    if path.name.startswith("scaling"):
        from benchmarks.bench_scaling import plot_axis

        return [plot_axis(rows, a, out_dir) for a in dict.fromkeys(r["axis"] for r in rows)][-1]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    p.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "plots")
    args = p.parse_args(argv)
    for path in sorted(args.results.glob("*.json")):
        out = plot_file(path, args.out)
        print(f"{path.name}: {out if out else 'no plot layout known, skipped'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
