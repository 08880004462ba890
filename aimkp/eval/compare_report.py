"""The report of ``aimkp compare``: ``compare.json``, ``compare.md``, ``compare.png``.

Per setting and method, for F1@1, F1@3, F1@5, MAP@5 and ``score`` (F1@1 + F1@3 + MAP@5, the
loop's selection score), all CMKP protocol, percent:

- ``mean``, ``lo``, ``hi``: the mean over seeds and its 95% t-interval (``None`` with one seed);
- ``per_seed``: the seeds' values;
- ``diff`` / ``diff_lo`` / ``diff_hi`` (methods after the first): the seed-averaged difference to
  the first method and its 95% paired-bootstrap percentile interval over test posts (every run
  rescored on the same resampled posts, :func:`aimkp.eval.stats.paired_bootstrap`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aimkp.deps import require
from aimkp.eval import stats
from aimkp.metrics import read_predictions

TOL = 1e-6  # per-post tables must reproduce the robustness run's own scores


def setting_table(run: dict[str, Any], setting: str, test_records: Sequence[Any]) -> np.ndarray:
    """Per-post score table ``[N, 7]`` of one run's saved predictions for ``setting``."""
    d = Path(run["dir"]) / "eval" / setting
    preds = read_predictions(str(d / "predictions" / f"{setting}.txt"))
    preds += [[] for _ in range(len(test_records) - len(preds))]  # trailing empty lines
    table = stats.post_table(
        [r.text for r in test_records], [r.keyphrases for r in test_records], preds
    )
    saved = json.loads((d / "robustness.json").read_text())["settings"][setting]
    got = stats.metrics_of(table)
    for k in ("F1@1", "F1@3", "F1@5", "MAP@5"):
        if abs(got[k] - saved[k]) > TOL:
            raise RuntimeError(f"{d}: rescored {k} {got[k]} != saved {saved[k]}")
    return table


def eval_seconds(run: dict[str, Any], settings: Sequence[str]) -> float:
    """Decoding + scoring seconds of a run's settings (``robustness.json`` timings)."""
    total = 0.0
    for s in settings:
        f = Path(run["dir"]) / "eval" / s / "robustness.json"
        total += float(json.loads(f.read_text())["seconds"][s])
    return total


def distinct_predictions(run: dict[str, Any], setting: str) -> int:
    """How many different ranked prediction lists the run produced on ``setting``'s posts: a
    model that answers every post alike (few distinct lists) has not learned to read its input,
    and no setting can show robustness on it."""
    f = Path(run["dir"]) / "eval" / setting / "predictions" / f"{setting}.txt"
    return len(set(f.read_text(encoding="utf-8").splitlines()))


def _cell(values: list[float]) -> dict[str, Any]:
    ti = stats.t_interval(values)
    return {"mean": ti["mean"], "lo": ti["lo"], "hi": ti["hi"], "per_seed": list(values)}


def setting_results(
    tables: dict[str, list[np.ndarray]], base: str, n_boot: int, boot_seed: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {metric: cell}}`` for one setting (module docstring)."""
    boot = stats.paired_bootstrap(tables, base, n_boot=n_boot, seed=boot_seed)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m, runs in tables.items():
        per_seed = [stats.metrics_of(t) for t in runs]
        out[m] = {}
        for k in stats.METRICS:
            cell = _cell([p[k] for p in per_seed])
            if m in boot:
                b = boot[m][k]
                cell.update(diff=b["diff"], diff_lo=b["lo"], diff_hi=b["hi"])
            out[m][k] = cell
    return out


def build_report(
    spec: Any, results: dict[str, dict[int, dict[str, Any]]], test_records: Sequence[Any]
) -> dict[str, Any]:
    """compare.json's content from the finished runs."""
    labels = [m.label for m in spec.methods]
    runs_out: dict[str, Any] = {}
    per_method: dict[str, Any] = {}
    for lab in labels:
        rows = {}
        for seed, r in sorted(results[lab].items()):
            ev = eval_seconds(r, spec.settings)
            rows[str(seed)] = {
                "epochs": r["epochs"],
                "trained_tokens": r["trained_tokens"],
                "train_s": r["train_s"],
                "eval_s": round(ev, 2),
                "best_epoch": r["best_epoch"],
                "best_valid_score": r["best_valid_score"],
                "distinct_predictions": {s: distinct_predictions(r, s) for s in spec.settings},
                "dir": r["dir"],
            }
        runs_out[lab] = rows
        per_method[lab] = {
            "wall_s": round(sum(v["train_s"] + v["eval_s"] for v in rows.values()), 1),
            "train_s": round(sum(v["train_s"] for v in rows.values()), 1),
            "trained_tokens_mean": float(np.mean([v["trained_tokens"] for v in rows.values()])),
            "epochs": sorted({v["epochs"] for v in rows.values()}),
            "distinct_predictions_mean": {
                s: float(np.mean([v["distinct_predictions"][s] for v in rows.values()]))
                for s in spec.settings
            },
        }
    res_settings = {}
    for s in spec.settings:
        tables = {
            lab: [setting_table(results[lab][seed], s, test_records) for seed in spec.seeds]
            for lab in labels
        }
        res_settings[s] = setting_results(tables, labels[0], spec.n_boot, spec.boot_seed)
    return {
        "command": spec.command,
        "protocol": "cmkp",
        "model": spec.base.get("model"),
        "data": spec.base.get("data"),
        "n_test_posts": len(test_records),
        "budget": spec.budget,
        "epochs": spec.epochs,
        "seeds": list(spec.seeds),
        "methods": labels,
        "base": labels[0],
        "settings": list(spec.settings),
        "metrics": list(stats.METRICS),
        "interval": "95% t-interval over seeds (mean +- t_{0.975,n-1} sd / sqrt(n))",
        "bootstrap": {
            "replicates": spec.n_boot,
            "seed": spec.boot_seed,
            "level": 0.95,
            "unit": "test posts, paired across methods and seeds",
        },
        "per_method": per_method,
        "runs": runs_out,
        "results": res_settings,
        "extra": dict(spec.extra),
    }


def _fmt(c: dict[str, Any]) -> str:
    if c["lo"] is None:
        return f"{c['mean']:.2f}"
    return f"{c['mean']:.2f} ± {(c['hi'] - c['lo']) / 2:.2f}"


def _fmt_diff(c: dict[str, Any]) -> str:
    if "diff" not in c:
        return "–"
    return f"{c['diff']:+.2f} [{c['diff_lo']:+.2f}, {c['diff_hi']:+.2f}]"


def markdown(rep: dict[str, Any]) -> str:
    """compare.md: one results table (settings x methods) and one cost table."""
    ms = rep["metrics"]
    lines = [
        f"`{rep['command']}`" if rep["command"] else "",
        "",
        f"{rep['model']} on {rep['data']}, {rep['n_test_posts']} test posts, CMKP protocol, "
        f"percent; seeds {rep['seeds']}; budget: {rep['budget']} ({rep['epochs']} epochs). "
        "Cells: mean ± half the 95% t-interval over seeds; Δ: difference to "
        f"`{rep['base']}` with its 95% paired-bootstrap interval over posts "
        f"({rep['bootstrap']['replicates']} replicates).",
        "",
        "| setting | method | " + " | ".join(ms) + " | Δ score |",
        "|---|---|" + "---:|" * (len(ms) + 1),
    ]
    for s in rep["settings"]:
        for m in rep["methods"]:
            c = rep["results"][s][m]
            cells = " | ".join(_fmt(c[k]) for k in ms)
            lines.append(f"| {s} | {m} | {cells} | {_fmt_diff(c['score'])} |")
    first = rep["settings"][0]
    lines += [
        "",
        "| method | epochs | trained tokens (mean) | train s | wall s (train + eval) | "
        f"distinct predictions on {first} (mean over seeds) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in rep["methods"]:
        p = rep["per_method"][m]
        ep = "/".join(str(e) for e in p["epochs"])
        lines.append(
            f"| {m} | {ep} | {p['trained_tokens_mean']:.0f} | {p['train_s']:.0f} | "
            f"{p['wall_s']:.0f} | {p['distinct_predictions_mean'][first]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rep: dict[str, Any], path: str | Path) -> None:
    """compare.png: grouped bars of ``score`` per setting, one bar per method, t-intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, methods = rep["settings"], rep["methods"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 4.2))
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(names))]
        cells = [rep["results"][s][m]["score"] for s in names]
        ys = [c["mean"] for c in cells]
        err = [
            [0 if c["lo"] is None else c["mean"] - c["lo"] for c in cells],
            [0 if c["hi"] is None else c["hi"] - c["mean"] for c in cells],
        ]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=m)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("F1@1 + F1@3 + MAP@5 (%)")
    ax.set_title(f"{rep['data']}: mean over seeds {rep['seeds']}, 95% t-intervals")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rep: dict[str, Any], out_dir: str | Path, with_plot: bool = True) -> list[str]:
    """Write compare.json / compare.md (/ compare.png); returns the paths. The tables are
    written first: a plot that cannot be drawn loses no result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rep, indent=1) + "\n")
    (out / "compare.md").write_text(markdown(rep))
    files = [str(out / "compare.json"), str(out / "compare.md")]
    if with_plot:
        require("matplotlib", "--no-plot", purpose="compare.png")  # the JSON is kept
        plot(rep, out / "compare.png")
        files.append(str(out / "compare.png"))
    return files
