"""Synthetic data, corruption suites and the robustness report (with a fake predictor)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from aimkp.data import Record, corrupt, load_dataset
from aimkp.data.synthetic import COLOURS, TOPICS, generate
from aimkp.eval.robustness import resolve_settings, run_robustness
from aimkp.metrics import read_predictions, score

CUE_TO_TOPIC = {c: t for t, (cues, _) in TOPICS.items() for c in (*cues, t)}


def fake_predict(records: list[Record]) -> list[list[str]]:
    """Reads the synthetic structure: topic from the text's cue words, colour from the image.

    Text-only posts yield the topic only; image-only posts yield nothing; a misaligned image
    gives the wrong colour, so every setting moves the scores in a known direction.
    """
    out = []
    for r in records:
        topics = [CUE_TO_TOPIC[w] for w in r.text.split() if w in CUE_TO_TOPIC]
        topic = max(set(topics), key=topics.count) if topics else None
        preds = [topic] if topic else []
        im = r.load_image()
        if im is not None and topic:
            a = np.asarray(im, dtype=np.float32).reshape(-1, 3)
            fg = a[a.min(axis=1) < 200]
            if len(fg):
                mean = fg.mean(axis=0)
                colour = min(
                    COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - mean) ** 2).sum())
                )
                preds.append(f"{colour} {TOPICS[topic][1]}")
        out.append(preds)
    return out


@pytest.fixture(scope="module")
def syn() -> list[Record]:
    return generate(48, seed=3, image_size=32)


def test_synthetic_ground_truth_and_determinism(syn) -> None:
    again = generate(48, seed=3, image_size=32)
    assert [r.keyphrases for r in syn] == [r.keyphrases for r in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(syn, again))
    assert [r.keyphrases for r in generate(48, seed=4, image_size=32)] != [
        r.keyphrases for r in syn
    ]
    for r in syn:
        topic, shape, joint = r.keyphrases
        assert r.meta["kp_source"] == {topic: "text", shape: "image", joint: "both"}
        assert shape not in r.text.split() and r.meta["colour"] not in r.text.split()
        assert joint == f"{r.meta['colour']} {TOPICS[topic][1]}"
        assert r.load_image().size == (32, 32)
    # the topic is named in the text for some posts only (present and absent keyphrases)
    named = sum(r.keyphrases[0] in r.text.split() for r in syn)
    assert 0 < named < len(syn)
    split = load_dataset("synthetic:5", "valid")
    assert len(split) == 128 and split[0].id.startswith("valid-")


def _pixels(r: Record) -> np.ndarray:
    return np.asarray(r.load_image(), dtype=np.int16)


def test_corruptions_never_mutate_and_are_deterministic(syn) -> None:
    recs = syn[:12]
    before = [(r.text, list(r.keyphrases), _pixels(r).copy(), dict(r.meta)) for r in recs]
    for name in corrupt.SETTINGS:
        a = corrupt.apply_setting(name, recs, seed=7)
        b = corrupt.apply_setting(name, recs, seed=7)
        assert len(a) == len(recs)
        assert all(x is not y for x, y in zip(a, recs))
        assert [x.text for x in a] == [y.text for y in b]
        assert all(x.meta["setting"] == name for x in a)
        assert [x.keyphrases for x in a] == [r.keyphrases for r in recs]
        for x, y in zip(a, b):
            if x.has_image:
                assert np.array_equal(_pixels(x), _pixels(y))
    for r, (text, kps, px, meta) in zip(recs, before):
        assert r.text == text and r.keyphrases == kps and r.meta == meta
        assert np.array_equal(_pixels(r), px)


def test_modality_removal(syn) -> None:
    t = corrupt.text_only(syn)
    assert all(not r.has_image and r.load_image() is None for r in t)
    assert [r.text for r in t] == [r.text for r in syn]
    i = corrupt.image_only(syn)
    assert all(r.text == "" and r.has_image for r in i)


def test_noisy_image_levels(syn) -> None:
    base = np.stack([_pixels(r) for r in syn[:8]]).astype(np.float64)
    errs = []
    for lv in corrupt.NOISE_LEVELS["gaussian"]:
        noisy = np.stack([_pixels(r) for r in corrupt.noisy_image(syn[:8], "gaussian", lv, 0)])
        errs.append(np.abs(noisy - base).mean())
    assert errs[0] < errs[1] < errs[2]
    # clipping at 0/255 only shrinks the noise: std of the difference is below level * 255
    noisy = np.stack([_pixels(r) for r in corrupt.noisy_image(syn[:8], "gaussian", 0.1, 0)])
    assert 0.5 * 25.5 < (noisy - base).std() < 25.5 * 1.05
    blur = [
        np.abs(
            np.stack([_pixels(r) for r in corrupt.noisy_image(syn[:8], "blur", lv, 0)]) - base
        ).mean()
        for lv in corrupt.NOISE_LEVELS["blur"]
    ]
    assert 0 < blur[0] < blur[1] < blur[2]
    with pytest.raises(ValueError, match="kind"):
        corrupt.noisy_image(syn, "salt", 0.1)


def test_noisy_text_levels() -> None:
    recs = [Record(str(i), " ".join(f"word{j}" for j in range(40)), ["k"]) for i in range(10)]
    kept = []
    for lv in corrupt.TEXT_LEVELS["drop"]:
        out = corrupt.noisy_text(recs, "drop", lv, seed=1)
        frac = sum(len(r.text.split()) for r in out) / 400
        kept.append(frac)
        assert abs(frac - (1 - lv)) < 0.08  # 400 tokens: binomial std <= 0.025
    assert kept[0] > kept[1] > kept[2]
    one = corrupt.noisy_text([Record("x", "solo", ["k"])], "drop", 1.0, seed=0)
    assert one[0].text == "solo"  # one token is always kept
    typo = corrupt.noisy_text(recs, "typo", 0.5, seed=2)
    changed = sum(
        a != b for r, t in zip(recs, typo) for a, b in zip(r.text.split(), t.text.split())
    )
    assert abs(changed / 400 - 0.5) < 0.1
    assert all(len(t.text.split()) == 40 for t in typo)


def test_misaligned_is_a_derangement(syn) -> None:
    out = corrupt.misaligned(syn, seed=11)
    ids = [r.meta["image_from"] for r in out]
    assert sorted(ids) == sorted(r.id for r in syn)
    assert all(a != r.id for a, r in zip(ids, syn))
    src = {r.id: r for r in syn}
    for r in out:
        assert r.image is src[r.meta["image_from"]].image
    rng = random.Random(0)
    for n in (2, 3, 7):
        for _ in range(20):
            p = corrupt.derangement(n, rng)
            assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
    # posts without an image keep none
    mixed = [syn[0], Record("t", "text", ["k"]), syn[1]]
    m = corrupt.misaligned(mixed, seed=0)
    assert m[1].image is None and m[0].image is syn[1].image and m[2].image is syn[0].image
    with pytest.raises(ValueError, match="at least two"):
        corrupt.misaligned([syn[0]], seed=0)


def test_run_robustness_report(tmp_path, syn) -> None:
    settings = ["clean", "text_only", "image_only", "misaligned", "noisy_text_drop_0.5"]
    res = run_robustness(fake_predict, syn, settings=settings, out_dir=tmp_path, seed=0)
    s = res["settings"]
    assert res["order"] == settings and res["n_posts"] == len(syn)
    # the fake reads topic from text and colour from the image: each setting's known effect
    assert s["clean"]["R@5"] == pytest.approx(100 * 2 / 3)  # topic + joint found, shape never
    assert s["text_only"]["R@5"] == pytest.approx(100 * 1 / 3)
    assert s["image_only"]["F1@1"] == 0.0
    assert s["text_only"]["F1@3"] < s["clean"]["F1@3"]
    assert s["misaligned"]["F1@3"] < s["clean"]["F1@3"]
    assert s["noisy_text_drop_0.5"]["F1@1"] <= s["clean"]["F1@1"]
    # the gold of the scoring is the clean record: image_only keeps present/absent of the text
    assert s["image_only"]["present"]["n_posts"] == s["clean"]["present"]["n_posts"]
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved["settings"]["clean"]["F1@1"] == pytest.approx(s["clean"]["F1@1"])
    md = (tmp_path / "robustness.md").read_text()
    assert md.count("\n| ") == len(settings) + 1 and "| clean | " in md
    assert f"| text_only | {s['text_only']['F1@1']:.2f} (" in md
    with Image.open(tmp_path / "robustness.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    # the saved predictions rescore to the same numbers
    for name in settings:
        preds = read_predictions(str(tmp_path / "predictions" / f"{name}.txt"))
        assert preds == fake_predict(corrupt.apply_setting(name, syn, 0))
        assert score(syn, preds)["F1@3"] == pytest.approx(s[name]["F1@3"])


def test_run_robustness_errors(syn) -> None:
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        run_robustness(fake_predict, syn, settings=["nope"])
    with pytest.raises(ValueError, match="returned 1 lists for 48 records"):
        run_robustness(lambda rs: [["x"]], syn, settings=["clean"])
    with pytest.raises(ValueError, match="not a list of strings"):
        run_robustness(lambda rs: ["x"] * len(rs), syn, settings=["clean"])
    assert resolve_settings("all") == list(corrupt.SETTINGS)
    assert resolve_settings(["clean,text_only", "clean"]) == ["clean", "text_only"]


def test_evaluate_cli_on_a_tiny_model(tmp_path, capsys) -> None:
    """End to end through load_predictor on the untrained tiny-llava preset (built offline)."""
    from aimkp.cli import main

    common = ["--data", "synthetic:0", "--max-samples", "1", "--settings", "clean,image_only"]
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path)])
    assert rc == 2 and "no such checkpoint directory" in capsys.readouterr().err
    out = tmp_path / "report"
    rc = main(["evaluate", "--checkpoint", "tiny-llava", "--output", str(out), *common])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads((out / "robustness.json").read_text())
    assert res["order"] == ["clean", "image_only"] and res["n_posts"] == 1
    assert (out / "robustness.png").stat().st_size > 0
    assert "| image_only |" in (out / "robustness.md").read_text()
