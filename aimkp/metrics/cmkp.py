"""The CMKP scoring protocol (the benchmark's own; Wang et al., EMNLP 2020).

Per post:

1. Porter-stem every word (lower-cased) of the text, the targets and the predictions.
2. Targets: duplicates (after stemming) removed. Predictions: duplicates removed (first kept) and
   invalid ones dropped: those containing a word ``<unk>``, ``,`` or ``.``, and empty ones.
3. A prediction hits when it equals a target word for word (after stemming).
4. ``P@k = hits in the top k / min(k, #predictions)`` (0 with no prediction),
   ``R@k = hits in the top k / #targets``,
   ``AP@k = (sum over hit ranks i <= k of P@i) / #targets``,
   ``NDCG@k = DCG@k / DCG@k of the same hits sorted first`` (0 with no hit).

Over posts: P@k and R@k are macro-averaged and ``F1@k = 2 P R / (P + R)`` is computed from the
averages (not averaged per post); ``MAP@k`` and ``NDCG@k`` are means. ``present`` / ``absent``:
a keyphrase is present when its stemmed words occur contiguously in the stemmed text; targets and
predictions are split that way, and each part is scored only over the posts with at least one
target of that kind. Results are percentages.

Worked example (one post): text ``"blue flowers in the wall"``, targets ``["wildflower hour",
"flowers"]``, predictions ``["flower", "wildflower hour", "flower"]`` -> stemmed predictions
``(flower), (wildflow hour)`` after dedup, hits ``[1, 1]``; P@1 = 1/1, R@1 = 1/2, P@3 = 2/2,
R@3 = 2/2, AP@5 = (1/1 + 2/2) / 2 = 1. Present targets: ``flower``; absent: ``wildflow hour``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .stem import stem_phrase, stem_word

INVALID_WORDS = frozenset({"<unk>", ",", "."})
KS = (1, 3, 5)


def _dedup(phrases: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    seen = set()
    out = []
    for p in phrases:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _valid(p: tuple[str, ...]) -> bool:
    return bool(p) and any(p) and not any(w in INVALID_WORDS for w in p)


def _stem_text(
    text: str, targets: list[tuple[str, ...]], preds: list[tuple[str, ...]]
) -> tuple[str | None, ...]:
    """The text's stemmed words, with ``None`` for words that cannot be part of any match here.

    Porter stemming only rewrites suffixes, so a word's stem starts with the word's own first
    (lower-cased) letter; a text word whose first letter starts no word of any target or
    prediction phrase can never be part of a match, and stemming it (the bulk of the cold cost)
    is skipped. Exactness is
    checked against full stemming in tests/metrics/test_metrics_cmkp.py.
    """
    firsts = {w[:1] for x in targets for w in x} | {w[:1] for x in preds for w in x}
    return tuple(stem_word(w) if w[:1].lower() in firsts else None for w in text.split())


def _present_mask(src: tuple[str | None, ...], phrases: list[tuple[str, ...]]) -> list[bool]:
    """True where the phrase occurs as contiguous words of ``src`` (both stemmed)."""
    words = set(src)
    out = []
    for p in phrases:
        found = False
        if p and p[0] in words:
            n = len(p)
            if n == 1:
                found = True
            else:
                for i, w in enumerate(src):
                    if w == p[0] and src[i : i + n] == p:
                        found = True
                        break
        out.append(found)
    return out


_LOG2 = [1.0 / math.log2(i + 2) for i in range(64)]


def _disc(i: int) -> float:
    return _LOG2[i] if i < 64 else 1.0 / math.log2(i + 2)


def _post_vec(
    targets: list[tuple[str, ...]], preds: list[tuple[str, ...]], ks: Sequence[int]
) -> list[float] | None:
    """``[P@k..., R@k..., AP@k..., NDCG@k...]`` for one post, or None when all are 0."""
    tset = set(targets)
    kmax = max(ks)
    hits = [p in tset for p in preds[:kmax]]
    if not any(hits):  # the common case: every score is 0
        return None
    n_pred, n_trg = len(preds), len(targets)
    # ideal DCG: all hits of the whole ranked list first (the CMKP reference sorts the hit vector)
    all_hits = sum(hits) + sum(p in tset for p in preds[kmax:])
    cum = 0
    ap = dcg = 0.0
    cum_at, ap_at, dcg_at = [], [], []
    for i, h in enumerate(hits):
        if h:
            cum += 1
            ap += cum / (i + 1)
            dcg += _disc(i)
        cum_at.append(cum)
        ap_at.append(ap)
        dcg_at.append(dcg)
    js = [min(k, len(hits)) - 1 for k in ks]
    prec = [cum_at[j] / min(k, n_pred) for j, k in zip(js, ks)]
    rec = [cum_at[j] / n_trg for j in js]
    aps = [ap_at[j] / n_trg for j in js]
    ndcg = [dcg_at[j] / sum(_disc(i) for i in range(min(all_hits, k))) for j, k in zip(js, ks)]
    return prec + rec + aps + ndcg


def post_scores(
    targets: list[tuple[str, ...]], preds: list[tuple[str, ...]], ks: Sequence[int] = KS
) -> dict[str, float]:
    """Per-post ``P@k, R@k, AP@k, NDCG@k`` (fractions) for stemmed, deduplicated, filtered
    phrase tuples, e.g. ``post_scores([("a",)], [("b",), ("a",)], (1, 3))["P@3"] == 0.5``."""
    vec = _post_vec(targets, preds, ks) or [0.0] * (4 * len(ks))
    names = [f"{m}@{k}" for m in ("P", "R", "AP", "NDCG") for k in ks]
    return dict(zip(names, vec))


class _Acc:
    """Sums of per-post vectors; posts whose scores are all 0 only bump the count."""

    def __init__(self, ks: Sequence[int]) -> None:
        self.ks = tuple(ks)
        self.n = 0
        self.sums = [0.0] * (4 * len(ks))

    def add(self, vec: list[float] | None) -> None:
        self.n += 1
        if vec is not None:
            self.sums = [a + b for a, b in zip(self.sums, vec)]

    def result(self) -> dict[str, float]:
        n, nk = self.n, len(self.ks)
        res: dict[str, float] = {"n_posts": n}
        for i, k in enumerate(self.ks):
            p = self.sums[i] / n if n else 0.0
            r = self.sums[nk + i] / n if n else 0.0
            res[f"P@{k}"] = 100 * p
            res[f"R@{k}"] = 100 * r
            res[f"F1@{k}"] = 100 * (2 * p * r / (p + r)) if p + r > 0 else 0.0
            res[f"MAP@{k}"] = 100 * self.sums[2 * nk + i] / n if n else 0.0
            res[f"NDCG@{k}"] = 100 * self.sums[3 * nk + i] / n if n else 0.0
        return res


def score_cmkp(
    texts: Sequence[str],
    targets: Sequence[Sequence[str]],
    predictions: Sequence[Sequence[str]],
    ks: Sequence[int] = KS,
) -> dict:
    """Score ranked predictions under the CMKP protocol.

    Args:
        texts: the posts' texts (tokenised; split on whitespace), ``[N]``.
        targets: gold keyphrases per post, ``[N][*]``.
        predictions: ranked predicted keyphrases per post, ``[N][*]``.
        ks: the cut-offs (default 1, 3, 5).

    Returns:
        ``{"protocol": "cmkp", "n_posts", "F1@k", "P@k", "R@k", "MAP@k", "NDCG@k",
        "present": {...}, "absent": {...}}`` with scores in percent.
    """
    if not (len(texts) == len(targets) == len(predictions)):
        raise ValueError(
            f"lengths differ: {len(texts)} texts, {len(targets)} target lists, "
            f"{len(predictions)} prediction lists"
        )
    acc_all, acc_pre, acc_abs = _Acc(ks), _Acc(ks), _Acc(ks)
    for i, (text, trg, pred) in enumerate(zip(texts, targets, predictions)):
        if isinstance(trg, str) or isinstance(pred, str):
            raise ValueError(f"post {i}: targets and predictions must be lists of phrases")
        t = [x for x in _dedup([stem_phrase(x) for x in trg]) if any(x)]
        p = [x for x in _dedup([stem_phrase(x) for x in pred]) if _valid(x)]
        acc_all.add(_post_vec(t, p, ks))
        src = _stem_text(text, t, p)
        tm = _present_mask(src, t)
        pm = _present_mask(src, p)
        t_pre = [x for x, m in zip(t, tm) if m]
        t_abs = [x for x, m in zip(t, tm) if not m]
        if t_pre:
            acc_pre.add(_post_vec(t_pre, [x for x, m in zip(p, pm) if m], ks))
        if t_abs:
            acc_abs.add(_post_vec(t_abs, [x for x, m in zip(p, pm) if not m], ks))
    res = {"protocol": "cmkp", **acc_all.result()}
    res["present"] = acc_pre.result()
    res["absent"] = acc_abs.result()
    return res
