"""CMKP / AimKP scoring: the released CMKP numbers, hand-computed posts, and edge cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.stem.porter import PorterStemmer

from aimkp.data import Record, read_records
from aimkp.metrics import cmkp as cmkp_mod
from aimkp.metrics import parse_prediction_line, read_predictions, score, score_aimkp, score_cmkp
from aimkp.metrics.stem import stem_tokens, stem_word


def _cmkp_files(shared_dir):
    d = shared_dir / "data" / "cmkp"
    return d / "test_src.txt", d / "m3h_att_test_pred.txt"


def test_released_cmkp_predictions_reproduce_paper_numbers(shared_dir) -> None:
    src, pred = _cmkp_files(shared_dir)
    recs = read_records(src, with_images=False)
    res = score(recs, read_predictions(str(pred)), protocol="cmkp")
    assert res["n_posts"] == 5372
    # the CMKP paper's numbers, to 2 decimals
    assert round(res["F1@1"], 2) == 47.13
    assert round(res["F1@3"], 2) == 33.22
    assert round(res["MAP@5"], 2) == 52.26
    assert 0 < res["present"]["n_posts"] < 5372 and 0 < res["absent"]["n_posts"] < 5372
    # every post has a present or an absent target (or both)
    assert res["present"]["n_posts"] + res["absent"]["n_posts"] >= 5372


def test_skipping_unneeded_text_stems_is_exact(shared_dir, monkeypatch) -> None:
    """The cold-path shortcut in _stem_text must give exactly the fully stemmed result."""
    src, pred = _cmkp_files(shared_dir)
    recs = read_records(src, with_images=False)[:1500]
    preds = read_predictions(str(pred))[:1500]
    args = ([r.text for r in recs], [r.keyphrases for r in recs], preds)
    fast = score_cmkp(*args)
    monkeypatch.setattr(cmkp_mod, "_stem_text", lambda text, t, p: stem_tokens(text.split()))
    assert score_cmkp(*args) == fast
    # the property it rests on: a Porter stem starts with the word's first lower-cased letter
    words = {w for r in recs for w in r.text.split()}
    assert all(stem_word(w)[:1] == w.lower()[:1] for w in words)


def test_cmkp_worked_example() -> None:
    # text has "flowers" -> stem "flower"; targets: "wildflower hour" (absent), "flowers" (present)
    res = score_cmkp(
        ["blue flowers in the wall"],
        [["wildflower hour", "flowers"]],
        [["flower", "wildflower hour", "flower", "x , y", "<unk>"]],
    )
    # after dedup and the invalid filter: (flower), (wildflow hour): both hit
    assert res["P@1"] == pytest.approx(100.0) and res["R@1"] == pytest.approx(50.0)
    assert res["F1@1"] == pytest.approx(100 * 2 * 0.5 / 1.5)
    assert res["P@3"] == pytest.approx(100.0)  # denominator min(3, 2 predictions)
    assert res["R@3"] == pytest.approx(100.0)
    assert res["MAP@5"] == pytest.approx(100.0)
    assert res["NDCG@5"] == pytest.approx(100.0)
    assert res["present"]["n_posts"] == 1 and res["present"]["F1@1"] == pytest.approx(100.0)
    assert res["absent"]["n_posts"] == 1 and res["absent"]["F1@1"] == pytest.approx(100.0)


def test_cmkp_macro_f1_from_averaged_p_and_r() -> None:
    # post 1: 1 pred, hit, 1 target -> P@1 = R@1 = 1; post 2: 1 pred, miss, 2 targets -> 0, 0
    # post 3: no prediction -> P = R = 0
    res = score_cmkp(["a", "b", "c"], [["x"], ["y", "z"], ["w"]], [["x"], ["q"], []])
    p, r = 1 / 3, 1 / 3
    assert res["F1@1"] == pytest.approx(100 * 2 * p * r / (p + r))
    # AP with a miss first: targets {a, b}; preds q, a, b -> (1/2 + 2/3) / 2
    res = score_cmkp(["t"], [["a", "b"]], [["q", "a", "b"]])
    assert res["MAP@5"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    assert res["NDCG@5"] == pytest.approx(100 * dcg / (1 + 1 / math.log2(3)))
    assert res["P@5"] == pytest.approx(100 * 2 / 3)  # min(5, 3 predictions)


def test_cmkp_target_dedup_after_stemming() -> None:
    # "dogs" and "dog" stem alike: one unique target, so R@1 = 1
    res = score_cmkp(["t"], [["dogs", "dog"]], [["dog"]])
    assert res["R@1"] == pytest.approx(100.0)


def test_aimkp_protocol_worked_example() -> None:
    res = score_aimkp([["cats", "dog"]], [["cat", "bird", "cat"]])
    assert res["P@1"] == pytest.approx(100.0) and res["R@1"] == pytest.approx(50.0)
    assert res["F1@1"] == pytest.approx(100 * 2 / 3)
    assert res["P@3"] == pytest.approx(100 / 3)  # hits / k although only 2 distinct predicted
    assert res["F1@5"] == pytest.approx(100 * 2 * 0.2 * 0.5 / 0.7)
    assert res["MAP@5"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 3) / 3)
    # F1 is averaged per post (not from averaged P and R)
    res2 = score_aimkp([["a"], ["b", "c"]], [["a"], ["x"]])
    assert res2["F1@1"] == pytest.approx(50.0)
    assert res2["MAP@5"] == pytest.approx(50.0)
    res3 = score_aimkp([["a"]], [[]])
    assert res3["MAP@5"] == 0.0 and res3["F1@1"] == 0.0


def test_protocols_differ_on_same_predictions(shared_dir) -> None:
    src, pred = _cmkp_files(shared_dir)
    recs = read_records(src, with_images=False)[:400]
    preds = read_predictions(str(pred))[:400]
    a, b = score(recs, preds, "cmkp"), score(recs, preds, "aimkp")
    assert a["protocol"] == "cmkp" and b["protocol"] == "aimkp"
    assert a["F1@3"] != pytest.approx(b["F1@3"])


def test_parse_prediction_line() -> None:
    assert parse_prediction_line("a b;c\n") == ["a b", "c"]
    assert parse_prediction_line("a b, c") == ["a b", "c"]
    assert parse_prediction_line("a, b;c") == ["a, b", "c"]  # ';' wins: the ',' phrase is invalid
    assert parse_prediction_line("  \n") == []


def test_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="protocol"):
        score([Record("0", "t", ["a"])], [["a"]], protocol="nope")
    with pytest.raises(ValueError, match="1 prediction lists for 2 records"):
        score([Record("0", "t", ["a"]), Record("1", "t", ["b"])], [["a"]])
    with pytest.raises(ValueError, match="no gold keyphrase"):
        score_aimkp([[]], [["a"]])


# ---------------------------------------------------------------------------------------------
# An obviously-correct, slow CMKP implementation straight from the protocol's definition, to
# check the fast paths (early exit on no hit, skipped text stems, n-gram search) on random posts.

_PS = PorterStemmer()
_VOCAB = ["cat", "cats", "running", "run", "blue", "skies", "sky", "the", "<unk>", ",", "."]


def _naive_cmkp(texts, targets, preds, ks=(1, 3, 5)):
    def stem(ph):
        return tuple(_PS.stem(w.lower()) for w in ph.split(" "))

    def present(src, ph):
        return any(tuple(src[i : i + len(ph)]) == ph for i in range(len(src) - len(ph) + 1))

    per = {"all": [], "present": [], "absent": []}
    for text, trg, pred in zip(texts, targets, preds):
        src = [_PS.stem(w.lower()) for w in text.split()]
        t = list(dict.fromkeys(stem(x) for x in trg))
        p = [x for x in dict.fromkeys(stem(x) for x in pred if x.strip())]
        p = [x for x in p if not set(x) & {"<unk>", ",", "."}]
        groups = {"all": (t, p)}
        tp = [x for x in t if present(src, x)]
        ta = [x for x in t if not present(src, x)]
        if tp:
            groups["present"] = (tp, [x for x in p if present(src, x)])
        if ta:
            groups["absent"] = (ta, [x for x in p if not present(src, x)])
        for g, (tt, pp) in groups.items():
            hits = [x in tt for x in pp]
            row = {}
            for k in ks:
                h = sum(hits[:k])
                row[f"P@{k}"] = h / min(k, len(pp)) if pp else 0.0
                row[f"R@{k}"] = h / len(tt)
                row[f"AP@{k}"] = sum(
                    sum(hits[: i + 1]) / (i + 1) for i in range(min(k, len(pp))) if hits[i]
                ) / len(tt)
                dcg = sum(1 / math.log2(i + 2) for i in range(min(k, len(pp))) if hits[i])
                idcg = sum(1 / math.log2(i + 2) for i in range(min(k, sum(hits))))
                row[f"NDCG@{k}"] = dcg / idcg if idcg else 0.0
            per[g].append(row)
    out = {}
    for g, rows in per.items():
        res = {"n_posts": len(rows)}
        for k in ks:
            n = max(len(rows), 1)
            p = sum(r[f"P@{k}"] for r in rows) / n
            r_ = sum(r[f"R@{k}"] for r in rows) / n
            res[f"F1@{k}"] = 100 * 2 * p * r_ / (p + r_) if p + r_ else 0.0
            res[f"MAP@{k}"] = 100 * sum(r[f"AP@{k}"] for r in rows) / n
            res[f"NDCG@{k}"] = 100 * sum(r[f"NDCG@{k}"] for r in rows) / n
        out[g] = res
    return out


_phrase = st.lists(st.sampled_from(_VOCAB), min_size=1, max_size=3).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(_VOCAB), min_size=0, max_size=12).map(" ".join),
            st.lists(
                _phrase.filter(lambda p: p not in (",", ".", "<unk>")), min_size=1, max_size=4
            ),
            st.lists(_phrase, min_size=0, max_size=8),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_cmkp_matches_naive_definition(posts) -> None:
    texts, targets, preds = (list(x) for x in zip(*posts))
    fast = score_cmkp(texts, targets, preds)
    slow = _naive_cmkp(texts, targets, preds)
    for group in ("all", "present", "absent"):
        got = fast if group == "all" else fast[group]
        assert got["n_posts"] == slow[group]["n_posts"]
        for key, want in slow[group].items():
            assert got[key] == pytest.approx(want, abs=1e-9), (group, key)
