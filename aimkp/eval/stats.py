"""Statistics of a method comparison: t-intervals over seeds, paired bootstrap over test posts.

Per-post CMKP scores come from :func:`aimkp.metrics.cmkp.score_cmkp` run on one post at a time
(``P@k``, ``R@k``, ``AP@5`` of that post); a metric on any multiset of posts is then recomputed
exactly as the protocol does: P@k and R@k macro-averaged, ``F1@k = 2 P R / (P + R)`` of the
averages, ``MAP@5`` the mean AP@5. A bootstrap replicate is that recomputation on resampled posts.

>>> table = post_table(texts, targets, predictions)      # [N, 7] per-post scores
>>> metrics_of(table)["F1@1"]                             # == score_cmkp(...)["F1@1"]
>>> paired_bootstrap({"a": [ta0, ta1], "b": [tb0, tb1]}, base="a", n_boot=1000, seed=0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from aimkp.metrics.cmkp import score_cmkp

KS = (1, 3, 5)
# columns of a per-post table, in percent
COLUMNS = tuple(f"P@{k}" for k in KS) + tuple(f"R@{k}" for k in KS) + ("MAP@5",)
METRICS = ("F1@1", "F1@3", "F1@5", "MAP@5", "score")  # score = F1@1 + F1@3 + MAP@5

# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (standard tables)
# fmt: off
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
# fmt: on
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom (table to 30, then the Cornish-Fisher series;
    scipy is not a dependency; the series is within 1e-4 of the exact value for df > 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and 95% t-interval over seeds: ``mean +- t_{0.975, n-1} * sd / sqrt(n)``
    (sample sd, ``ddof=1``); with one value the interval is ``None`` (undefined)."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return {"mean": mean, "lo": None, "hi": None, "sd": None, "n": 1}
    sd = float(x.std(ddof=1))
    half = t_quantile_975(x.size - 1) * sd / math.sqrt(x.size)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": int(x.size)}


def post_table(
    texts: Sequence[str], targets: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]
) -> np.ndarray:
    """Per-post CMKP scores, float64 ``[N, len(COLUMNS)]`` in percent (one row per post)."""
    if not (len(texts) == len(targets) == len(predictions)):
        raise ValueError(
            f"lengths differ: {len(texts)} texts, {len(targets)} targets, "
            f"{len(predictions)} predictions"
        )
    rows = []
    for text, trg, pred in zip(texts, targets, predictions):
        m = score_cmkp([text], [trg], [pred])
        rows.append([m[c] for c in COLUMNS])
    return np.asarray(rows, dtype=np.float64).reshape(len(texts), len(COLUMNS))


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    s = p + r
    return np.where(s > 0, 2 * p * r / np.where(s > 0, s, 1.0), 0.0)


def metrics_from_means(means: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from column means ``[..., len(COLUMNS)]`` (the protocol's F1 of the averages)."""
    nk = len(KS)
    out = {f"F1@{k}": _f1(means[..., i], means[..., nk + i]) for i, k in enumerate(KS)}
    out["MAP@5"] = means[..., 2 * nk]
    out["score"] = out["F1@1"] + out["F1@3"] + out["MAP@5"]
    return out


def metrics_of(table: np.ndarray) -> dict[str, float]:
    """The metrics of a per-post table over all its posts (equals ``score_cmkp`` on them)."""
    return {k: float(v) for k, v in metrics_from_means(table.mean(axis=0)).items()}


def bootstrap_indices(n_posts: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n_posts]`` post indices drawn with replacement (numpy PCG64 seeded ``seed``)."""
    if n_posts < 1 or n_boot < 1:
        raise ValueError(f"need n_posts >= 1 and n_boot >= 1, got {n_posts}, {n_boot}")
    return np.random.default_rng(seed).integers(0, n_posts, size=(n_boot, n_posts))


def replicate_metrics(tables: Sequence[np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric ``[n_boot]`` per replicate, averaged over the runs (seeds) in ``tables``:
    every run is rescored on the same resampled posts ``idx [n_boot, N]``."""
    per_run = [metrics_from_means(t[idx].mean(axis=1)) for t in tables]
    return {k: np.mean([m[k] for m in per_run], axis=0) for k in METRICS}


def paired_bootstrap(
    tables: Mapping[str, Sequence[np.ndarray]],
    base: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Paired bootstrap over test posts of each method's difference to ``base``.

    Args:
        tables: method -> its runs' per-post tables (one per seed), all over the same N posts.
        base: the method every other one is compared with.
        n_boot: replicates; seed: the resampling seed (the same posts for every method).

    Returns:
        ``{method: {metric: {"diff", "lo", "hi"}}}`` (methods other than ``base``): ``diff`` the
        observed difference of the seed-averaged metric, ``lo``/``hi`` the 2.5 / 97.5 percentiles
        of the replicates' differences (percent points).
    """
    if base not in tables:
        raise ValueError(f"base method {base!r} has no tables")
    sizes = {t.shape[0] for runs in tables.values() for t in runs}
    if len(sizes) != 1:
        raise ValueError(f"per-post tables cover different numbers of posts: {sorted(sizes)}")
    idx = bootstrap_indices(sizes.pop(), n_boot, seed)
    rep = {m: replicate_metrics(runs, idx) for m, runs in tables.items()}
    obs = {
        m: {k: np.mean([metrics_of(t)[k] for t in runs]) for k in METRICS}
        for m, runs in tables.items()
    }
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in tables:
        if m == base:
            continue
        out[m] = {}
        for k in METRICS:
            d = rep[m][k] - rep[base][k]
            lo, hi = np.percentile(d, [2.5, 97.5])
            out[m][k] = {"diff": float(obs[m][k] - obs[base][k]), "lo": float(lo), "hi": float(hi)}
    return out
