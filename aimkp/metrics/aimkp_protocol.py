"""The AimKP protocol (the scoring script released with the AimKP paper).

Per post, with gold keyphrases ``G`` (a list, duplicates kept) and outputs ``O`` (the model's text
split on ``,`` and stripped; here: the ranked predicted phrases), every phrase Porter-stemmed word
by word:

- ``hits@k = |set(G) & set(O[:k])|``; ``P@k = hits@k / k`` even when fewer than k are predicted;
  ``R@k = hits@k / len(G)``; ``F1@k`` is computed per post and AVERAGED over posts (unlike CMKP).
- ``MAP@5`` is the mean over posts of ``(P'@1 + ... + P'@L) / L`` with ``L = min(len(O), 5)`` and
  ``P'@i = |set(G) & set(O[:i])| / i`` (0 when ``L == 0``): a mean of precisions, not average
  precision.
- ``NDCG@k`` is not in the reference script; it is given here as the standard binary NDCG on the
  deduplicated stemmed outputs, ideal = ``min(|set(G)|, k)`` hits first.

Worked example: ``G = ["cats", "dog"]``, ``O = ["cat", "bird", "cat"]`` -> ``hits@1 = 1``,
``P@1 = 1``, ``R@1 = 1/2``, ``F1@1 = 2/3``; ``hits@3 = 1``, ``P@3 = 1/3``; ``MAP@5 = (1/1 + 1/2 +
1/3) / 3``. Results are percentages; they cannot be compared with CMKP-protocol numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .stem import stem_phrase

KS = (1, 3, 5)


def _ndcg(gold: set, outs: list[tuple[str, ...]], k: int) -> float:
    seen = set()
    dcg = 0.0
    rank = 0
    for o in outs:
        if o in seen:
            continue
        seen.add(o)
        if rank >= k:
            break
        if o in gold:
            dcg += 1.0 / math.log2(rank + 2)
        rank += 1
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(gold), k)))
    return dcg / ideal if ideal > 0 else 0.0


def score_aimkp(
    targets: Sequence[Sequence[str]],
    predictions: Sequence[Sequence[str]],
    ks: Sequence[int] = KS,
    map_k: int = 5,
) -> dict:
    """Score ranked predictions under the AimKP protocol.

    Args:
        targets: gold keyphrases per post, ``[N][*]`` (a post with no gold phrase is an error).
        predictions: ranked predicted keyphrases per post, ``[N][*]``.
        ks: F1 / P / R / NDCG cut-offs.
        map_k: the ``L`` cap of the protocol's MAP (5 in the paper).

    Returns:
        ``{"protocol": "aimkp", "n_posts", "F1@k", "P@k", "R@k", "NDCG@k", "MAP@5"}`` in percent.
    """
    if len(targets) != len(predictions):
        raise ValueError(f"lengths differ: {len(targets)} targets, {len(predictions)} predictions")
    n = len(targets)
    f1 = dict.fromkeys(ks, 0.0)
    prec = dict.fromkeys(ks, 0.0)
    rec = dict.fromkeys(ks, 0.0)
    ndcg = dict.fromkeys(ks, 0.0)
    map_sum = 0.0
    for i, (g, o) in enumerate(zip(targets, predictions)):
        if isinstance(g, str) or isinstance(o, str):
            raise ValueError(f"post {i}: targets and predictions must be lists of phrases")
        if len(g) == 0:
            raise ValueError(f"post {i}: no gold keyphrase (the protocol divides by their count)")
        gs = {stem_phrase(x) for x in g}
        os_ = [stem_phrase(x) for x in o]
        for k in ks:
            c = len(gs & set(os_[:k]))
            p, r = c / k, c / len(g)
            prec[k] += p
            rec[k] += r
            f1[k] += 2 * p * r / (p + r) if p + r > 0 else 0.0
            ndcg[k] += _ndcg(gs, os_, k)
        L = min(len(os_), map_k)
        if L:
            s = 0.0
            seen: set = set()
            for j in range(L):
                seen.add(os_[j])
                s += len(gs & seen) / (j + 1)
            map_sum += s / L
    d = max(n, 1)
    res: dict = {"protocol": "aimkp", "n_posts": n}
    for k in ks:
        res[f"P@{k}"] = 100 * prec[k] / d
        res[f"R@{k}"] = 100 * rec[k] / d
        res[f"F1@{k}"] = 100 * f1[k] / d
        res[f"NDCG@{k}"] = 100 * ndcg[k] / d
    res[f"MAP@{map_k}"] = 100 * map_sum / d
    return res
