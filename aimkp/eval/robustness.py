"""Robustness report: the same model on clean and corrupted inputs.

:func:`run_robustness` applies each setting of :mod:`aimkp.data.corrupt` to the records, asks
``predict_fn`` for ranked keyphrases, scores them against the ORIGINAL records (gold keyphrases
and, for the CMKP present/absent split, the original text) and writes:

- ``robustness.json``: every metric per setting, the protocol, seed, sizes and timings;
- ``robustness.md``: a Markdown table of the headline metrics, with the change against clean;
- ``robustness.png``: grouped bars, one group per setting, one bar per metric (matplotlib Agg);
- ``predictions/<setting>.txt``: the ranked predictions, one line per post (``aimkp score``
  rescores them).

>>> res = run_robustness(model.predict, records, out_dir="runs/robust", seed=0)
>>> res["settings"]["text_only"]["F1@1"]
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aimkp.data import Record
from aimkp.data.corrupt import DEFAULT_SETTINGS, SETTINGS, apply_setting
from aimkp.deps import require
from aimkp.errors import DataError, UsageError
from aimkp.metrics import HEADLINE, PROTOCOLS, score

logger = logging.getLogger("aimkp.eval")

PredictFn = Callable[[list[Record]], list[list[str]]]


def resolve_settings(settings: Sequence[str] | str | None) -> list[str]:
    """``None`` -> the default list; ``"all"`` -> every setting; names are checked."""
    if settings is None:
        return list(DEFAULT_SETTINGS)
    if isinstance(settings, str):
        settings = [settings]
    out: list[str] = []
    for s in settings:
        for name in (x.strip() for x in s.split(",")):
            if not name:
                continue
            names = list(SETTINGS) if name == "all" else [name]
            for n in names:
                if n not in SETTINGS:
                    raise UsageError(f"unknown setting {n!r}; known: all, {', '.join(SETTINGS)}")
                if n not in out:
                    out.append(n)
    if not out:
        raise UsageError("no settings given")
    return out


def _check_preds(preds: Any, n: int, setting: str) -> list[list[str]]:
    if not isinstance(preds, list) or len(preds) != n:
        got = len(preds) if isinstance(preds, list) else type(preds).__name__
        raise ValueError(f"setting {setting!r}: predict_fn returned {got} lists for {n} records")
    for i, p in enumerate(preds):
        if isinstance(p, str) or not all(isinstance(x, str) for x in p):
            raise ValueError(f"setting {setting!r}: prediction {i} is not a list of strings")
    return preds


def run_robustness(
    predict_fn: PredictFn,
    records: Sequence[Record],
    settings: Sequence[str] | str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    protocol: str = "cmkp",
    plot: bool = True,
) -> dict[str, Any]:
    """Score ``predict_fn`` on clean and corrupted copies of ``records``.

    Args:
        predict_fn: ``list[Record] -> list[list[str]]`` (ranked keyphrases per record).
        records: the evaluation records (not modified).
        settings: setting names (see :data:`aimkp.data.corrupt.SETTINGS`), ``"all"``, or ``None``
            for :data:`aimkp.data.corrupt.DEFAULT_SETTINGS`.
        out_dir: where to write ``robustness.{json,md,png}`` (nothing written when ``None``).
        seed: corruption seed.
        protocol: ``"cmkp"`` or ``"aimkp"``.
        plot: draw ``robustness.png`` (needs matplotlib).

    Returns:
        ``{"protocol", "seed", "n_posts", "order": [setting, ...], "settings": {setting:
        metrics}, "seconds": {setting: s}, "files": {...}}``.
    """
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    records = list(records)
    if not records:
        raise DataError("no records to evaluate")
    names = resolve_settings(settings)
    if plot and out_dir is not None:  # named before decoding, not after it
        require("matplotlib", "plot=False", purpose="robustness.png")
    res: dict[str, Any] = {
        "protocol": protocol,
        "seed": seed,
        "n_posts": len(records),
        "order": names,
        "settings": {},
        "seconds": {},
    }
    for name in names:
        t0 = time.perf_counter()
        inputs = apply_setting(name, records, seed)
        preds = _check_preds(predict_fn(inputs), len(records), name)
        res["settings"][name] = score(records, preds, protocol=protocol)
        res["seconds"][name] = round(time.perf_counter() - t0, 3)
        if out_dir is not None:
            write_predictions(preds, Path(out_dir) / "predictions" / f"{name}.txt")
        logger.info("robustness %s: F1@1 %.2f", name, res["settings"][name]["F1@1"])
    if out_dir is not None:
        res["files"] = write_report(res, out_dir, plot=plot)
    return res


def write_predictions(preds: list[list[str]], path: str | os.PathLike[str]) -> None:
    """One line per post, phrases joined by ``;`` (``aimkp score --pred`` reads it back)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in preds:
            f.write(";".join(" ".join(x.replace(";", " ").split()) for x in p) + "\n")


def markdown_table(res: dict[str, Any]) -> str:
    """The headline metrics per setting as a Markdown table (change vs clean in brackets)."""
    base = res["settings"].get("clean")
    head = "| setting | " + " | ".join(HEADLINE) + " |"
    lines = [
        f"Protocol: {res['protocol']}; {res['n_posts']} posts; seed {res['seed']}.",
        "",
        head,
        "|---|" + "---:|" * len(HEADLINE),
    ]
    for name in res["order"]:
        m = res["settings"][name]
        cells = []
        for k in HEADLINE:
            cell = f"{m[k]:.2f}"
            if base is not None and name != "clean":
                cell += f" ({m[k] - base[k]:+.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_report(res: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Grouped bar chart: one group per setting, one bar per headline metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = res["order"]
    width = 0.8 / len(HEADLINE)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))
    for j, metric in enumerate(HEADLINE):
        xs = [i + (j - (len(HEADLINE) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [res["settings"][n][metric] for n in names], width, label=metric)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    top = max((res["settings"][n][m] for n in names for m in HEADLINE), default=0.0)
    ax.set_ylim(0, max(5.0, min(100.0, top * 1.1)))
    ax.set_ylabel("score (%)")
    ax.set_title(f"Robustness ({res['protocol']} protocol, {res['n_posts']} posts)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    res: dict[str, Any], out_dir: str | os.PathLike[str], plot: bool = True
) -> dict[str, str]:
    """Write ``robustness.json``, ``robustness.md`` and (``plot``) ``robustness.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "robustness.json"), "markdown": str(out / "robustness.md")}
    if plot:
        files["plot"] = str(out / "robustness.png")
    # the tables first: a plot that fails (no matplotlib, a full disk) loses no result
    Path(files["markdown"]).write_text(markdown_table(res), encoding="utf-8")
    with open(files["json"], "w", encoding="utf-8") as f:
        json.dump({**res, "files": files}, f, indent=2)
    if plot:
        plot_report(res, files["plot"])
    return files
