"""Prediction: parsing, all three decodings on a tiny preset that memorised its records,
batching, checkpoint round trip and the ``aimkp predict`` CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from PIL import Image

from aimkp.cli import predict as predict_cli
from aimkp.eval.predict import (
    GenerationKwargs,
    GenerationOptions,
    Predictor,
    load_predictor,
    parse_keyphrases,
)
from aimkp.models import collate_rows, forward_rows, load_model, save_checkpoint
from tests.helpers.models import (
    Record,
    image,
    records,
    tiny,
)

MEMO = [
    ("mm", "wildflower hour in the spring meadow", ["wildflower hour", "spring"], 0),
    ("text-only", "christmas tree icon vector clip art", ["christmas", "tree"], None),
    ("image-only", "", ["red car", "night"], "red"),
]


def _image(seed):
    if seed is None:
        return None
    # a solid colour is told apart from noise quickly by the random tiny vision tower
    return Image.new("RGB", (64, 64), (220, 30, 30)) if seed == "red" else image(seed)


def memo_records() -> list:
    return [Record(i, t, k, image=_image(s)) for i, t, k, s in MEMO]


@pytest.fixture(scope="module")
def memorised():
    """tiny-llava with its language model + projector trained until it recites MEMO."""
    loaded = tiny("tiny-llava", lora=False)
    from aimkp.models.lora import apply_lora

    apply_lora(loaded, full=True)
    samples = [loaded.adapter.encode(r) for r in memo_records()]
    keeps = [torch.ones(s.length, dtype=torch.bool) for s in samples]
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-3)
    batch = collate_rows(loaded, samples, keeps, list(range(len(samples))))
    n = float(sum(s.n_answer_tokens for s in samples))
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        loss = forward_rows(loaded, batch).loss_sum.sum() / n
        loss.backward()
        opt.step()
        if float(loss) < 0.02:
            break
    assert float(loss) < 0.05, f"memorisation did not converge (loss {float(loss):.3f})"
    loaded.model.eval()
    return loaded


def test_parse_keyphrases():
    assert parse_keyphrases("Wildflower hour, spring; spring , ,") == ["wildflower hour", "spring"]
    assert parse_keyphrases("") == []
    assert parse_keyphrases("  a   b ;A B; c") == ["a b", "c"]


@pytest.mark.parametrize("decoding", ["greedy", "beam", "sample"])
def test_decodings_recite_memorised_keyphrases(memorised, decoding):
    kw = {"temperature": 0.05} if decoding == "sample" else {}
    pred = Predictor(memorised, decoding=decoding, num_beams=3, max_new_tokens=16, **kw)
    got = pred.predict(memo_records())
    assert got == [k for _, _, k, _ in MEMO]


def test_batching_and_sampling_seed(memorised):
    recs = memo_records()
    one = Predictor(memorised, batch_size=1, max_new_tokens=16).generate_text(recs)
    many = Predictor(memorised, batch_size=3, max_new_tokens=16).generate_text(recs)
    assert one == many  # left padding changes nothing
    hot = {"decoding": "sample", "temperature": 3.0, "max_new_tokens": 8}
    a = Predictor(memorised, seed=7, **hot).generate_text(recs)
    b = Predictor(memorised, seed=7, **hot).generate_text(recs)
    c = Predictor(memorised, seed=8, **hot).generate_text(recs)
    assert a == b and a != c


def test_modality_settings(memorised):
    rec = memo_records()[0]
    adapter = memorised.adapter
    text_only = adapter.encode(rec, with_answer=False, use_image=False)
    image_only = adapter.encode(rec, with_answer=False, use_text=False)
    assert text_only.image_span is None and adapter.image_token_id not in text_only.input_ids
    assert image_only.text_span[0] == image_only.text_span[1]
    for m in ("text", "image"):
        out = Predictor(memorised, modality=m, max_new_tokens=8).predict([rec])
        assert len(out) == 1 and isinstance(out[0], list)


def test_bad_arguments(memorised):
    with pytest.raises(ValueError, match="decoding"):
        Predictor(memorised, decoding="nucleus")
    with pytest.raises(ValueError, match="modality"):
        Predictor(memorised, modality="audio")
    with pytest.raises(ValueError, match="temperature"):
        Predictor(memorised, decoding="sample", temperature=0.0)


def test_generation_options_and_overrides(memorised):
    fields = [f.name for f in dataclasses.fields(GenerationOptions)]
    assert list(GenerationKwargs.__annotations__) == fields  # the keywords are the fields
    beam = GenerationOptions(decoding="beam", num_beams=3)
    pred = Predictor(memorised, beam, batch_size=2)  # one field changed, the rest kept
    assert pred.options == GenerationOptions(decoding="beam", num_beams=3, batch_size=2)
    assert Predictor(memorised).options == GenerationOptions()
    with pytest.raises(ValueError, match="batch_size and max_new_tokens must be >= 1"):
        Predictor(memorised, beam, batch_size=0)
    Predictor.check_options(decoding="beam", device="cpu")  # unknown keywords are ignored
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        Predictor.check_options(decoding="beam", num_beams=0)
    parser = argparse.ArgumentParser()
    predict_cli.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "c", "--out", "o"])
    assert predict_cli._generation_options(args) == GenerationOptions()  # the flags' defaults


def test_checkpoint_and_cli_round_trip(memorised, tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt", memorised, extra_json={"epoch": 1})
    meta = json.loads((ckpt / "aimkp.json").read_text())
    assert meta["preset"] == "tiny-llava" and meta["extra"] == {"epoch": 1}
    reloaded = load_model(ckpt)
    assert reloaded.preset == "tiny-llava"
    pred = load_predictor(str(ckpt), device="cpu", max_new_tokens=16)
    want = [k for _, _, k, _ in MEMO]
    assert pred.predict(memo_records()) == want

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    with (data / "test.jsonl").open("w") as f:
        for rid, text, kps, seed in MEMO:
            obj = {"id": rid, "text": text, "keyphrases": kps}
            if seed is not None:
                _image(seed).save(data / "images" / f"{rid}.png")
                obj["image"] = f"images/{rid}.png"
            f.write(json.dumps(obj) + "\n")
    from aimkp.cli import main

    out = tmp_path / "pred.txt"
    rc = main(
        ["predict", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out)]
        + ["--max-new-tokens", "16", "--device", "cpu"]
    )
    assert rc == 0
    assert out.read_text().splitlines() == [";".join(k) for k in want]


@pytest.mark.parametrize("decoding", ["greedy", "beam"])
def test_qwen_batched_generation_equals_one_by_one(decoding):
    """Left-padded Qwen2-VL batches mixing images / no images (M-RoPE from the padded mask,
    per-image grids for beam expansion) decode exactly as each record alone."""
    loaded = tiny("tiny-qwen2vl")
    recs = records()
    kw = {"decoding": decoding, "num_beams": 2, "max_new_tokens": 5}
    batched = Predictor(loaded, batch_size=4, **kw).generate_text(recs)
    alone = [Predictor(loaded, batch_size=1, **kw).generate_text([r])[0] for r in recs]
    assert batched == alone
