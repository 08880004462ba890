"""Row forward: compact (packed varlen) vs attention-mask formulation, positions, pitfalls."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from aimkp.models import collate_rows, flash_varlen_kwargs, forward_rows
from tests.helpers.models import (
    random_keeps,
    records,
    tiny,
)
from tests.helpers.rows import GRAD_RTOL, LOSS_RTOL
from tests.helpers.rows import run_rows as _run

PRESETS = ["tiny-llava", "tiny-qwen2vl"]
ALL_PRESETS = [*PRESETS, "tiny-qwen25vl"]


@pytest.mark.parametrize(
    ("name", "layout"), [(n, "packed") for n in ALL_PRESETS] + [(n, "padded") for n in PRESETS]
)
def test_compact_equals_attention_losses_and_grads(name, layout):
    loaded = tiny(name)
    samples = [loaded.adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=3)
    b_c, out_c, g_c = _run(loaded, samples, keeps, rows, "compact", layout)
    assert b_c.layout == layout and (b_c.cu_seqlens is None) == (layout == "padded")
    b_a, out_a, g_a = _run(loaded, samples, keeps, rows, "attention")
    assert out_a.ran.mode == "attention" and out_c.ran.mode == "compact"
    assert b_c.num_rows == b_a.num_rows == len(rows)
    torch.testing.assert_close(out_c.loss_sum, out_a.loss_sum, rtol=LOSS_RTOL, atol=0)
    want_n = torch.tensor([samples[i].n_answer_tokens for i in rows])
    assert torch.equal(out_c.n_tokens.cpu(), want_n) and torch.equal(out_a.n_tokens.cpu(), want_n)
    # masked copies really differ from their originals
    assert not torch.allclose(out_c.loss_sum[0::3], out_c.loss_sum[1::3])
    assert set(g_c) == set(g_a)
    lora = [n for n in g_c if "lora_" in n]
    proj = [n for n in g_c if "lora_" not in n]
    assert lora and proj, "LoRA and projector parameters must both get gradients"
    for n in g_c:
        scale = g_a[n].abs().max().clamp_min(1e-12)
        assert (g_c[n] - g_a[n]).abs().max() <= GRAD_RTOL * scale, n
        assert g_a[n].abs().max() > 0, f"{n}: zero gradient"


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_unmasked_row_matches_model_own_forward(name):
    """An all-kept row's mean CE equals the HF model's own loss (its vision path, its mask)."""
    loaded = tiny(name)
    adapter = loaded.adapter
    rec = records()[0]
    s = adapter.encode(rec)
    batch = collate_rows(loaded, [s], [torch.ones(s.length, dtype=torch.bool)], [0])
    with torch.no_grad():
        ours = forward_rows(loaded, batch).loss_sum / s.n_answer_tokens
        kw = adapter.generation_kwargs([s], s.input_ids[None])
        ref = adapter.base(input_ids=s.input_ids[None], labels=s.labels[None], **kw).loss
    torch.testing.assert_close(ours[0], ref, rtol=1e-5, atol=1e-6)


def test_packing_equals_separate_rows():
    """Packed rows (block-diagonal mask) give each row the loss it has alone."""
    loaded = tiny("tiny-llava")
    samples = [loaded.adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=2, seed=3)
    with torch.no_grad():
        packed = forward_rows(loaded, collate_rows(loaded, samples, keeps, rows)).loss_sum
        alone = torch.cat(
            [
                forward_rows(loaded, collate_rows(loaded, samples, [k], [i])).loss_sum
                for k, i in zip(keeps, rows)
            ]
        )
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=0)


def test_position_jumps_without_mask_would_be_wrong():
    """Packed-rows pitfall: with no explicit mask transformers splits at position jumps."""
    loaded = tiny("tiny-llava")
    s = loaded.adapter.encode(records()[0])
    keep = torch.ones(s.length, dtype=torch.bool)
    keep[s.image_span[0] : s.image_span[1] - 1] = False  # a big jump in position ids
    batch = collate_rows(loaded, [s], [keep], [0])
    lm = loaded.adapter.language_model
    from aimkp.ops.masked_embedding_ref import masked_embedding_reference

    feats = loaded.adapter.sample_image_features([s])[0]
    emb = masked_embedding_reference(
        batch.input_ids,
        loaded.adapter.embed_tokens.weight,
        keep=batch.keep,
        image_features=feats,
        image_token_id=loaded.adapter.image_token_id,
        compact=True,
    ).values[None]
    with torch.no_grad():
        pos = batch.position_ids
        ours = lm(
            inputs_embeds=emb, attention_mask=batch.attn_mask, position_ids=pos, use_cache=False
        )
        inferred = lm(inputs_embeds=emb, attention_mask=None, position_ids=pos, use_cache=False)
    gap = (ours.last_hidden_state - inferred.last_hidden_state).abs().max()
    assert gap > 1e-2  # the inferred boundary blocks attention across the jump


def test_qwen_positions_keep_unmasked_values():
    loaded = tiny("tiny-qwen2vl")
    adapter = loaded.adapter
    samples = [adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=2, seed=5)
    for s in samples:
        ids = s.input_ids[None]
        full, _ = adapter.base.model.get_rope_index(
            ids, mm_token_type_ids=adapter.mm_token_type_ids(ids), image_grid_thw=s.image_grid_thw
        )
        assert torch.equal(s.position_ids, full[:, 0])
        if s.image_span is not None:  # multimodal RoPE: image rows / columns differ
            a, b = s.image_span
            assert s.position_ids[1, a:b].unique().numel() == s.grid[0]
            assert s.position_ids[2, a:b].unique().numel() == s.grid[1]
    compact = collate_rows(loaded, samples, keeps, rows, mode="compact")
    attention = collate_rows(loaded, samples, keeps, rows, mode="attention")
    assert compact.position_ids.shape == (3, 1, compact.n_kept)
    cu = compact.cu_seqlens.tolist()
    for r, (k, si) in enumerate(zip(keeps, rows)):
        want = samples[si].position_ids[:, k]
        assert torch.equal(compact.position_ids[:, 0, cu[r] : cu[r + 1]], want)
        n = samples[si].length
        assert torch.equal(attention.position_ids[:, r, :n], samples[si].position_ids)
    # what the model would do if hidden text tokens went through its mask: renumbered positions
    s = samples[0]
    k = torch.ones(s.length, dtype=torch.bool)
    k[s.text_span[0] : s.text_span[1] - 1] = False
    ids = s.input_ids[None]
    renum, _ = adapter.base.model.get_rope_index(
        ids,
        mm_token_type_ids=adapter.mm_token_type_ids(ids),
        image_grid_thw=s.image_grid_thw,
        attention_mask=k[None].long(),
    )
    assert not torch.equal(renum[:, 0, k], s.position_ids[:, k])


def test_eager_attention_matches_sdpa():
    sd = tiny("tiny-llava", attn="sdpa")
    ea = tiny("tiny-llava", attn="eager")
    samples = [sd.adapter.encode(r) for r in records()[:2]]
    keeps, rows = random_keeps(samples, copies=2)
    with torch.no_grad():
        for mode in ("compact", "attention"):
            a = forward_rows(sd, collate_rows(sd, samples, keeps, rows, mode=mode)).loss_sum
            b = forward_rows(ea, collate_rows(ea, samples, keeps, rows, mode=mode)).loss_sum
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_cu_seqlens_known_before_forward():
    loaded = tiny("tiny-llava", lora=False)
    samples = [loaded.adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=2)
    batch = collate_rows(loaded, samples, keeps, rows)
    counts = torch.tensor([int(k.sum()) for k in keeps])
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, *torch.cumsum(counts, 0).tolist()]
    assert batch.num_rows == len(rows) and batch.n_kept == int(counts.sum())
    assert batch.max_seqlen == int(counts.max())


def test_row_batch_to_moves_every_tensor_field():
    loaded = tiny("tiny-llava", lora=False)
    samples = [loaded.adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=2)
    batch = collate_rows(loaded, samples, keeps, rows, layout="padded")
    moved = batch.to("meta")
    tensors = [
        f.name for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), Tensor)
    ]
    assert {"input_ids", "attn_mask", "scatter_index", "pred_row"} <= set(tensors)
    for name in tensors:
        assert getattr(moved, name).device.type == "meta", name
        assert getattr(batch, name).device.type == "cpu", name  # the batch itself is unchanged
    assert moved.samples is batch.samples and moved.module_rows is batch.module_rows
    assert (moved.num_rows, moved.n_kept, moved.layout) == (batch.num_rows, batch.n_kept, "padded")


def test_flash_varlen_kwargs():
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    kw = flash_varlen_kwargs(cu)
    assert kw["cu_seq_lens_q"].dtype == torch.int32
    assert torch.equal(kw["cu_seq_lens_q"], cu) and torch.equal(kw["cu_seq_lens_k"], cu)
    assert kw["max_length_q"] == kw["max_length_k"] == 7
    assert isinstance(kw["max_length_q"], int)
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_varlen_kwargs(torch.tensor([0, 5, 3]))
    with pytest.raises(ValueError, match="1-D"):
        flash_varlen_kwargs(torch.tensor([0]))


def test_collate_rejects_bad_rows():
    loaded = tiny("tiny-llava", lora=False)
    s = loaded.adapter.encode(records()[0])
    ok = torch.ones(s.length, dtype=torch.bool)
    bad = ok.clone()
    bad[s.text_span[1]] = False  # the instruction right after the text
    with pytest.raises(ValueError, match="only text / image positions"):
        collate_rows(loaded, [s], [bad], [0])
    with pytest.raises(ValueError, match="mode"):
        collate_rows(loaded, [s], [ok], [0], mode="dense")
    with pytest.raises(ValueError, match="BoolTensor"):
        collate_rows(loaded, [s], [ok[:-1]], [0])
    with pytest.raises(ValueError, match="out of range"):
        collate_rows(loaded, [s], [ok], [1])


_VARLEN_CALLS: list[int] = []


def _varlen_reference_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    max_length_k=None,
    **kwargs,
):
    """What ``flash_attn_varlen_func(causal=True)`` computes, in plain torch: causal attention
    within each packed row of ``cu_seq_lens``. query ``[1, H, K, Dh]`` -> ``[1, K, H, Dh]``."""
    assert attention_mask is None, "the varlen path must not build a mask"
    assert cu_seq_lens_q is not None and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
    cu = cu_seq_lens_q.tolist()
    assert max_length_q == max_length_k == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    out = torch.empty_like(query)
    for a, b in zip(cu[:-1], cu[1:]):
        out[:, :, a:b] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scaling
        )
    _VARLEN_CALLS.append(len(cu) - 1)
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("name", PRESETS)
def test_varlen_path_passes_cu_seqlens(name, monkeypatch):
    """The flash-attn path, run on CPU through a torch stand-in for flash_attn_varlen_func
    registered as a transformers attention implementation: no mask, cu_seq_lens reach every
    layer, and losses / gradients equal the SDPA block-mask path."""
    from transformers import AttentionInterface

    import aimkp.models.forward as fwd

    AttentionInterface.register("aimkp_varlen_ref", _varlen_reference_attention)
    monkeypatch.setattr(fwd, "VARLEN_ATTENTION", fwd.VARLEN_ATTENTION | {"aimkp_varlen_ref"})
    ref = tiny(name)
    var = tiny(name)
    var.adapter.base.set_attn_implementation({"text_config": "aimkp_varlen_ref"})
    assert var.adapter.attn_implementation == "aimkp_varlen_ref"
    samples = [ref.adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=2, seed=11)
    b_r, out_r, g_r = _run(ref, samples, keeps, rows, "compact")
    _VARLEN_CALLS.clear()
    b_v, out_v, g_v = _run(var, samples, keeps, rows, "compact")
    assert b_v.attn_mask is None and b_r.attn_mask is not None
    assert _VARLEN_CALLS == [len(rows)] * var.adapter.config.text_config.num_hidden_layers
    torch.testing.assert_close(out_v.loss_sum, out_r.loss_sum, rtol=LOSS_RTOL, atol=0)
    for n in g_r:
        scale = g_r[n].abs().max().clamp_min(1e-12)
        assert (g_v[n] - g_r[n]).abs().max() <= GRAD_RTOL * scale, n
    with pytest.raises(ValueError, match="compact mode only"):
        collate_rows(var, samples, keeps, rows, mode="attention")


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_tower_once_per_sample_projector_once_per_row(name):
    """Split vision path == the model's own get_image_features; the projector sees each row."""
    loaded = tiny(name)
    adapter = loaded.adapter
    samples = [adapter.encode(r) for r in records()]
    with_img = [s for s in samples if s.pixel_values is not None]
    thw = (
        None
        if with_img[0].image_grid_thw is None
        else torch.cat([s.image_grid_thw for s in with_img])
    )
    pv = torch.cat([s.pixel_values for s in with_img])
    with torch.no_grad():
        kw = {} if thw is None else {"image_grid_thw": thw}
        own = adapter.base.model.get_image_features(pixel_values=pv, **kw).pooler_output
        own = torch.cat(list(own), 0)
        ours = adapter.image_features(pv, thw)
    torch.testing.assert_close(ours, own, rtol=0, atol=0)

    keeps, rows = random_keeps(samples, copies=3)
    seen: dict[str, int] = {"tower": 0, "proj": 0}
    h1 = adapter.vision_tower.register_forward_pre_hook(
        lambda m, a, kw=None: seen.__setitem__("tower", seen["tower"] + 1)
    )
    h2 = adapter.projector.register_forward_hook(
        lambda m, a, o: seen.__setitem__("proj", seen["proj"] + a[0].shape[0])
    )
    try:
        with torch.no_grad():
            forward_rows(loaded, collate_rows(loaded, samples, keeps, rows))
    finally:
        h1.remove()
        h2.remove()
    k = adapter.vision_tokens_per_image_token
    per_row = [samples[i].grid[0] * samples[i].grid[1] * k for i in rows if samples[i].grid]
    assert seen["tower"] == 1  # all images of all distinct samples in one tower call
    assert seen["proj"] == sum(per_row)  # projector input: every row's own copy


def test_padded_compact_layout_positions_and_auto():
    loaded = tiny("tiny-qwen2vl", lora=False)
    samples = [loaded.adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=2, seed=9)
    b = collate_rows(loaded, samples, keeps, rows, layout="auto")  # sdpa -> padded
    counts = [int(k.sum()) for k in keeps]
    assert b.layout == "padded" and b.cu_seqlens is None
    assert b.position_ids.shape == (3, len(rows), max(counts)) and b.n_kept == sum(counts)
    for r, (k, si) in enumerate(zip(keeps, rows)):
        assert torch.equal(b.position_ids[:, r, : counts[r]], samples[si].position_ids[:, k])
        assert b.attn_mask[r, 0, -1, : counts[r]].all()  # last slot (pad or kept) sees the row
        if counts[r] < max(counts):
            assert not b.attn_mask[r, 0, -1, counts[r] : -1].any()  # padding is never a key
    with pytest.raises(ValueError, match="layout"):
        collate_rows(loaded, samples, keeps, rows, layout="ragged")


_HYP_LOADED: dict[str, object] = {}


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_collate_index_bookkeeping(data):
    """For any keep masks: in every layout the position before each target holds the token that
    precedes it in the kept sequence, targets are the answer tokens, positions are gathered."""
    if "l" not in _HYP_LOADED:
        _HYP_LOADED["l"] = tiny("tiny-llava", lora=False)
    loaded = _HYP_LOADED["l"]
    samples = [loaded.adapter.encode(r) for r in records()[:3]]
    rows = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=5))
    keeps = []
    for si in rows:
        s = samples[si]
        k = torch.ones(s.length, dtype=torch.bool)
        for span in (s.text_span, s.image_span):
            if span is not None and span[1] > span[0]:
                bits = data.draw(
                    st.lists(st.booleans(), min_size=span[1] - span[0], max_size=span[1] - span[0])
                )
                k[span[0] : span[1]] = torch.tensor(bits)
        keeps.append(k)
    kept_ids = [samples[si].input_ids[k] for si, k in zip(rows, keeps)]
    kept_pos = [samples[si].position_ids[k] for si, k in zip(rows, keeps)]
    want_targets = torch.cat([samples[si].labels[samples[si].labels != -100] for si in rows])
    for layout in ("packed", "padded"):
        b = collate_rows(loaded, samples, keeps, rows, layout=layout)
        assert torch.equal(b.targets, want_targets)
        if layout == "packed":
            seq = torch.cat(kept_ids)
            pos = b.position_ids.reshape(-1)
            assert torch.equal(pos, torch.cat(kept_pos))
        else:
            km = b.max_seqlen
            seq = torch.full((len(rows) * km,), -1, dtype=torch.long)
            seq[b.scatter_index] = torch.cat(kept_ids)
            for r, p in enumerate(kept_pos):
                assert torch.equal(b.position_ids[r, : p.numel()], p)
        # the token right after each predicting position is its target, in the same row
        assert torch.equal(seq[b.pred_index + 1], b.targets)
        assert torch.equal(b.n_tokens, torch.bincount(b.pred_row, minlength=len(rows)))
