"""Idefics3 / SmolVLM adapter on the ``tiny-idefics3`` preset: the HF model class (and the HF
processor's prompt) are the oracle; row modes, the AimKP step, prediction and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from aimkp.models import QUESTION, collate_rows, forward_rows, load_model, save_checkpoint
from aimkp.models.idefics3 import Idefics3Adapter
from tests.helpers.models import (
    Record,
    random_keeps,
    records,
    tiny,
)
from tests.helpers.rows import GRAD_RTOL, LOSS_RTOL
from tests.helpers.rows import run_rows as _run
from tests.helpers.train import assert_step_matches_reference, encoded_with_twin_strides
from tests.helpers.train import trainable_grads as _grads
from tests.helpers.train import varied_records as _records
from tests.helpers.train import zero_trainable_grads as _zero

NAME = "tiny-idefics3"


@pytest.fixture(scope="module")
def loaded():
    return tiny(NAME)


def test_segment_and_pixels_match_hf_processor(loaded):
    """Our prompt ids and pixels equal what ``Idefics3Processor`` makes of the same chat."""
    from transformers import Idefics3Processor

    a = loaded.adapter
    assert isinstance(a, Idefics3Adapter) and a.vision_tokens_per_image_token == 4
    rec = records()[3]  # non-square 50 x 70: resized to one untiled 64 x 64 image
    s = a.encode(rec, with_answer=False)
    assert s.grid == (4, 4) and s.image_span[1] - s.image_span[0] == 16
    tok = copy.deepcopy(loaded.tokenizer)
    proc = Idefics3Processor(
        image_processor=loaded.image_processor, tokenizer=tok, image_seq_len=16
    )
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": rec.text + "\n" + QUESTION}],
        }
    ]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    hf = proc(text=prompt, images=[rec.load_image()], return_tensors="pt", add_special_tokens=False)
    assert hf["input_ids"][0].tolist() == s.input_ids.tolist()
    torch.testing.assert_close(hf["pixel_values"].reshape(s.pixel_values.shape), s.pixel_values)
    ids = s.input_ids.tolist()
    i0, i1 = s.image_span
    fake = tok.convert_tokens_to_ids("<fake_token_around_image>")
    assert ids[i0 - 2 : i0] == [fake, tok.convert_tokens_to_ids("<global-img>")]
    assert ids[i1] == fake and set(ids[i0:i1]) == {a.image_token_id}


def test_lora_targets_and_trainable_set():
    """LoRA on the text model's 14 linears only; connector trainable; ViT and lm_head frozen."""
    from aimkp.models.lora import apply_lora, language_linear_names

    loaded = tiny(NAME, lora=False)
    names = language_linear_names(loaded.model)
    assert len(names) == 2 * 7 and all(n.startswith("model.text_model.") for n in names)
    apply_lora(loaded, r=4, alpha=8)
    a = loaded.adapter
    proj = {id(p) for p in a.projector.parameters()}
    for n, p in loaded.model.named_parameters():  # the projector: peft's modules_to_save copy
        trained_proj = id(p) in proj and ".modules_to_save.default." in n
        assert p.requires_grad == (trained_proj or ("lora_" in n and "text_model" in n)), n
    assert proj and not any(p.requires_grad for p in a.vision_tower.parameters())
    assert not a.lm_head.weight.requires_grad


def test_features_and_logits_equal_hf_forward(loaded):
    """image_features == the model's get_image_features; unmasked rows' loss == HF's loss."""
    a = loaded.adapter
    samples = [a.encode(r) for r in records()]
    with_img = [s for s in samples if s.pixel_values is not None]
    kw = a.generation_kwargs(samples, samples[0].input_ids[None])
    with torch.no_grad():
        ref = torch.cat(a.base.get_image_features(kw["pixel_values"]).pooler_output)
        ours = a.image_features(torch.cat([s.pixel_values for s in with_img]))
        assert ours.shape == (16 * len(with_img), 128)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        for s in samples:
            kw = a.generation_kwargs([s], s.input_ids[None])
            out = a.base(input_ids=s.input_ids[None], labels=s.labels[None], **kw)
            batch = collate_rows(loaded, [s], [torch.ones(s.length, dtype=torch.bool)], [0])
            got = forward_rows(loaded, batch).loss_sum[0] / s.n_answer_tokens
            torch.testing.assert_close(got, out.loss, rtol=1e-5, atol=1e-6)
    # the features reach the logits: changing the image changes HF's logits at the answer
    s = samples[0]
    other = a.encode(Record("x", records()[0].text, ["x"], image=Image.new("RGB", (64, 64))))
    with torch.no_grad():
        l1 = a.base(input_ids=s.input_ids[None], **a.generation_kwargs([s], s.input_ids[None]))
        l2 = a.base(input_ids=s.input_ids[None], pixel_values=other.pixel_values[:, None])
    assert not torch.allclose(l1.logits, l2.logits)


def test_compact_equals_attention_losses_and_grads():
    loaded = tiny(NAME)
    samples = [loaded.adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=3)
    _, out_c, g_c = _run(loaded, samples, keeps, rows, "compact", "padded")
    _, out_a, g_a = _run(loaded, samples, keeps, rows, "attention")
    torch.testing.assert_close(out_c.loss_sum, out_a.loss_sum, rtol=LOSS_RTOL, atol=0)
    assert not torch.allclose(out_c.loss_sum[0::3], out_c.loss_sum[1::3])
    assert set(g_c) == set(g_a) and any("connector" in n for n in g_c)
    assert any("lora_" in n for n in g_c)
    for n in g_c:
        scale = g_a[n].abs().max().clamp_min(1e-12)
        assert (g_c[n] - g_a[n]).abs().max() <= GRAD_RTOL * scale, n
        assert g_a[n].abs().max() > 0, f"{n}: zero gradient"


def test_aimkp_step_matches_reference():
    """Per-row connector gradients (engine module_rows on the post-shuffle linear) are exact."""
    from aimkp.method.options import StepOptions
    from aimkp.method.reference import reference_step
    from aimkp.method.step import aimkp_step, plan_rows
    from aimkp.models.lora import apply_lora

    recs = _records(3, seed=2)
    loaded = load_model(NAME, train_texts=[r.text for r in recs], seed=2)
    apply_lora(loaded, r=8, alpha=16, dropout=0.0)
    samples, n_total, t_a, t_r = encoded_with_twin_strides(loaded, recs, text=2, image=2)
    opts = StepOptions(tau_text=0.1, tau_image=0.9)
    res = aimkp_step(loaded, samples, [0, 1, 2], t_a, n_total, opts)
    mr = plan_rows(loaded, samples, res.rows, n_total, opts).batch.module_rows
    proj = [n for n in mr if "connector" in n]
    assert proj and torch.equal(
        mr[proj[0]].diff(), torch.tensor([16 * (c.sample != 2) for c in res.rows])
    )
    g_a = _grads(loaded)
    _zero(loaded)
    _, info = reference_step(loaded, samples, [0, 1, 2], t_r, n_total, opts)
    g_r = _grads(loaded)
    assert not all(res.decision.kept.tolist()), "a rejected copy exercises the reweighting"
    assert_step_matches_reference(res, info, g_a, g_r, cos_atol=1e-5)


def test_greedy_predict_and_checkpoint_round_trip(tmp_path):
    """Memorise three records; greedy ``Predictor`` (batched, left-padded, mixed image / no image)
    recites them; the saved checkpoint reloads with the same logits and predictions."""
    from aimkp.eval.predict import Predictor
    from aimkp.models.lora import apply_lora

    loaded = tiny(NAME, lora=False)
    apply_lora(loaded, full=True)
    recs = [
        Record(
            "mm",
            "wildflower hour in the spring meadow",
            ["wildflower hour", "spring"],
            image=Image.new("RGB", (64, 64), (30, 30, 220)),
        ),
        Record("text-only", "christmas tree icon vector clip art", ["christmas", "tree"]),
        Record(
            "image-only", "", ["red car", "night"], image=Image.new("RGB", (64, 64), (220, 30, 30))
        ),
    ]
    samples = [loaded.adapter.encode(r) for r in recs]
    keeps = [torch.ones(s.length, dtype=torch.bool) for s in samples]
    batch = collate_rows(loaded, samples, keeps, list(range(3)))
    opt = torch.optim.Adam([p for p in loaded.model.parameters() if p.requires_grad], lr=5e-3)
    n = float(sum(s.n_answer_tokens for s in samples))
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        loss = forward_rows(loaded, batch).loss_sum.sum() / n
        loss.backward()
        opt.step()
        if float(loss.detach()) < 0.02:
            break
    assert float(loss.detach()) < 0.05, (
        f"memorisation did not converge (loss {float(loss.detach()):.3f})"
    )
    loaded.model.eval()
    want = [r.keyphrases for r in recs]
    assert (
        Predictor(loaded, decoding="greedy", max_new_tokens=12, batch_size=3).predict(recs) == want
    )

    save_checkpoint(tmp_path, loaded)
    back = load_model(tmp_path)
    assert back.preset == NAME and isinstance(back.adapter, Idefics3Adapter)
    s2 = [back.adapter.encode(r) for r in recs]
    with torch.no_grad():
        for a, b in zip(samples, s2):
            assert torch.equal(a.input_ids, b.input_ids)
            torch.testing.assert_close(b.pixel_values, a.pixel_values)
            kw_a = loaded.adapter.generation_kwargs([a], a.input_ids[None])
            kw_b = back.adapter.generation_kwargs([b], b.input_ids[None])
            la = loaded.adapter.base(input_ids=a.input_ids[None], **kw_a).logits
            lb = back.adapter.base(input_ids=b.input_ids[None], **kw_b).logits
            torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    assert Predictor(back, decoding="greedy", max_new_tokens=12, batch_size=2).predict(recs) == want
