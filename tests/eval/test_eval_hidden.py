"""The hidden-modality settings: keep-mask greedy decoding with positions kept."""

from __future__ import annotations

import pytest
import torch

from aimkp.data import load_dataset
from aimkp.data.corrupt import apply_setting
from aimkp.eval.hidden import KeepMaskPredictor, hidden_keep, predict_fn_for
from aimkp.eval.predict import Predictor


@pytest.fixture(scope="module")
def setup():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    from aimkp.models import load_model

    recs = list(load_dataset("synthetic-split:1", "test", n=5))
    loaded = load_model("tiny-llava", train_texts=[r.text for r in recs], seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an untrained tiny model emits one token forever: make it talk
        for name, p in loaded.model.named_parameters():
            if "language_model" in name or "lm_head" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    yield loaded, recs
    torch.set_num_threads(n)


def test_all_kept_equals_generate(setup) -> None:
    loaded, recs = setup
    want = Predictor(loaded, max_new_tokens=8, batch_size=3).predict(recs)
    got = KeepMaskPredictor(loaded, max_new_tokens=8, batch_size=3).predict(recs, None)
    assert got == want
    assert len({tuple(p) for p in want}) > 1  # the outputs say something post-specific


def test_keep_mask_keeps_one_token_of_the_hidden_span(setup) -> None:
    loaded, recs = setup
    s = loaded.adapter.encode(recs[0], with_answer=False)
    for kind, span in (("text", s.text_span), ("image", s.image_span)):
        keep = hidden_keep(s, kind)
        a, b = span
        assert keep[a:b].tolist() == [False] * (b - a - 1) + [True]
        assert bool(keep[:a].all()) and bool(keep[b:].all())
    assert bool(hidden_keep(s, None).all())


def test_hidden_settings_route_and_change_the_input(setup) -> None:
    loaded, recs = setup
    pred = Predictor(loaded, max_new_tokens=8)
    fn = predict_fn_for(pred)
    clean = fn(apply_setting("clean", recs))
    hidden = KeepMaskPredictor(loaded, max_new_tokens=8)
    for name, kind in (("text_hidden", "text"), ("image_hidden", "image")):
        marked = apply_setting(name, recs)
        out = fn(marked)
        assert out == hidden.predict(recs, kind)
        assert out != clean
        with pytest.raises(ValueError, match="keep-mask decoder"):
            pred.predict(marked)  # a plain Predictor would silently decode them clean
    mixed = apply_setting("clean", recs[:2]) + apply_setting("text_hidden", recs[2:])
    assert fn(mixed) == clean[:2] + hidden.predict(recs[2:], "text")
