"""The statistics of ``aimkp compare``: t-intervals, per-post CMKP tables, the paired bootstrap."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from aimkp.eval import stats
from aimkp.metrics.cmkp import score_cmkp

WORDS = ("flower", "tree", "cat", "dog", "sun", "blue sky", "red car", "river")


def _posts(n: int, seed: int) -> tuple[list[str], list[list[str]], list[list[str]]]:
    rng = random.Random(seed)
    texts, targets, preds = [], [], []
    for _ in range(n):
        texts.append(" ".join(rng.sample(WORDS, 3)))
        targets.append(rng.sample(WORDS, rng.randint(1, 3)))
        preds.append(rng.sample(WORDS, rng.randint(0, 6)))
    return texts, targets, preds


def test_t_quantile_matches_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 29, 30, 31, 45, 100, 1000):
        assert stats.t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-4)


def test_t_interval_by_hand() -> None:
    ti = stats.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t_{0.975,2} = 4.3027
    half = 4.3027 / math.sqrt(3)
    assert ti["mean"] == 2.0 and ti["sd"] == 1.0 and ti["n"] == 3
    assert ti["lo"] == pytest.approx(2.0 - half) and ti["hi"] == pytest.approx(2.0 + half)
    one = stats.t_interval([5.0])
    assert one["mean"] == 5.0 and one["lo"] is None and one["hi"] is None
    with pytest.raises(ValueError):
        stats.t_interval([])


def test_post_table_reproduces_the_protocol() -> None:
    texts, targets, preds = _posts(40, 0)
    want = score_cmkp(texts, targets, preds)
    got = stats.metrics_of(stats.post_table(texts, targets, preds))
    for k in ("F1@1", "F1@3", "F1@5", "MAP@5"):
        assert got[k] == pytest.approx(want[k], abs=1e-9)
    assert got["score"] == pytest.approx(want["F1@1"] + want["F1@3"] + want["MAP@5"])


def test_a_replicate_is_the_metric_recomputed_on_resampled_posts() -> None:
    texts, targets, preds = _posts(30, 1)
    table = stats.post_table(texts, targets, preds)
    idx = stats.bootstrap_indices(30, 3, seed=7)
    rep = stats.replicate_metrics([table], idx)
    for b in range(3):
        sel = idx[b].tolist()
        want = score_cmkp(
            [texts[i] for i in sel], [targets[i] for i in sel], [preds[i] for i in sel]
        )
        assert rep["F1@3"][b] == pytest.approx(want["F1@3"], abs=1e-9)
        assert rep["MAP@5"][b] == pytest.approx(want["MAP@5"], abs=1e-9)


def test_bootstrap_indices_are_seeded() -> None:
    a = stats.bootstrap_indices(10, 5, seed=3)
    assert a.shape == (5, 10) and a.min() >= 0 and a.max() < 10
    assert np.array_equal(a, stats.bootstrap_indices(10, 5, seed=3))
    assert not np.array_equal(a, stats.bootstrap_indices(10, 5, seed=4))


def _one_target_posts(n: int, right: set[int]) -> np.ndarray:
    """n posts with target ``x``; the prediction is ``x`` on the posts in ``right``, else ``y``."""
    return stats.post_table(
        ["t"] * n, [["x"]] * n, [["x"] if i in right else ["y"] for i in range(n)]
    )


def test_paired_bootstrap_hand_checkable() -> None:
    n = 8
    base = _one_target_posts(n, set())
    always = _one_target_posts(n, set(range(n)))
    first = _one_target_posts(n, {0})
    out = stats.paired_bootstrap(
        {"base": [base, base], "always": [always, always], "first": [first, base]},
        base="base",
        n_boot=500,
        seed=11,
    )
    assert set(out) == {"always", "first"}
    # right on every post: F1@1 is 100 on every replicate
    a = out["always"]["F1@1"]
    assert a == {"diff": 100.0, "lo": 100.0, "hi": 100.0}
    assert out["always"]["score"]["diff"] == pytest.approx(300.0)  # F1@1 + F1@3 + MAP@5
    # right on post 0 in one of two seeds: a replicate's F1@1 difference is
    # (100 * (times post 0 was drawn) / n) / 2 (seed mean), P@1 = R@1 so F1 = P
    idx = stats.bootstrap_indices(n, 500, seed=11)
    d = 100.0 * (idx == 0).sum(axis=1) / n / 2
    f = out["first"]["F1@1"]
    assert f["diff"] == pytest.approx(100.0 / n / 2)
    assert f["lo"] == pytest.approx(np.percentile(d, 2.5))
    assert f["hi"] == pytest.approx(np.percentile(d, 97.5))
    assert f["lo"] <= f["diff"] <= f["hi"]


def test_paired_bootstrap_rejects_mismatched_posts() -> None:
    with pytest.raises(ValueError, match="different numbers of posts"):
        stats.paired_bootstrap(
            {"a": [_one_target_posts(3, set())], "b": [_one_target_posts(4, set())]}, base="a"
        )
