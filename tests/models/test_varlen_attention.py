"""Packed rows through aimkp's registered varlen attention (``--attn varlen``) == padded rows
through SDPA: per-row losses, parameter gradients, the engine's norms / cosines / reweight, on
tiny LLaVA, Qwen2-VL (3 x T positions) and Idefics3. On the CPU the varlen path runs the
reference kernel (one causal SDPA per row); the torch kernel's argument handling is checked
against a stand-in with each torch release's signature.

Tolerances as in test_forward.py (fp32; packed and padded attention reorder the same sums).
"""

from __future__ import annotations

import pytest
import torch

import aimkp.models.attention as A
from aimkp.models import collate_rows, forward_rows
from tests.helpers.cuda import requires_cuda
from tests.helpers.models import (
    random_keeps,
    records,
    tiny,
)
from tests.helpers.rows import engine_run_rows as _engine_run

PRESETS = ["tiny-llava", "tiny-qwen2vl", "tiny-idefics3"]
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _dense_causal_blocks(q, k, v, cu, scale):
    """Block-diagonal causal attention with one dense mask: q [K, Hq, D], k / v [K, Hkv, D]."""
    K = q.shape[0]
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    mask = torch.ones(K, K, dtype=torch.bool).tril_() & (seg[:, None] == seg[None, :])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (4, 2), (6, 1)])
def test_reference_kernel_equals_dense_block_mask(hq, hkv):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    cu = torch.tensor([0, 5, 5, 12, 13, 20], dtype=torch.int32)  # an empty and a 1-token row
    q = torch.randn(20, hq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(20, hkv, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got = A.varlen_reference(q, k, v, cu, scale=0.3)
    torch.testing.assert_close(got, _dense_causal_blocks(q, k, v, cu.long(), 0.3))


def _signature_stand_in(style: str, calls: list):
    """A varlen_attn with torch 2.10's (``is_causal``) or a later (``*, window_size, scale,
    enable_gqa``) signature, computing with the reference so the result is checkable."""
    if style == "2.10":

        def fn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
            assert is_causal and q.shape[1] == k.shape[1]
            calls.append(("2.10", max_q))
            return A.varlen_reference(q, k, v, cu_q, scale=None)

    else:

        def fn(
            q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False,
        ):  # fmt: skip
            assert tuple(window_size) == (-1, 0)
            assert enable_gqa == (q.shape[1] != k.shape[1])
            calls.append(("2.12", max_q))
            return A.varlen_reference(q, k, v, cu_q, scale=scale)

    return fn


@pytest.mark.parametrize("style", ["2.10", "2.12"])
def test_torch_kernel_arguments_across_releases(style, monkeypatch):
    calls: list = []
    monkeypatch.setattr(A, "torch_varlen_attn", lambda: _signature_stand_in(style, calls))
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    q = torch.randn(9, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(9, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got = A.packed_attention(q, k, v, cu, 5, 0.2, A.TORCH_KERNEL)
    assert calls == [(style, 5)] and A.last_kernel() == A.TORCH_KERNEL
    torch.testing.assert_close(got, _dense_causal_blocks(q, k, v, cu.long(), 0.2))


def test_resolve_attention_and_kernel_choice():
    assert A.resolve_attention("auto", "cpu") == "sdpa"  # CPU numbers do not move
    assert A.resolve_attention("varlen", "cpu") == A.VARLEN_IMPL
    assert A.resolve_attention("sdpa", None) == "sdpa"
    with pytest.raises(ValueError, match="attn must be one of"):
        A.resolve_attention("ring", "cpu")
    assert A.pick_kernel(torch.zeros(2, 1, 4, dtype=torch.bfloat16)) == A.REFERENCE_KERNEL
    assert A.kernel_name("sdpa") is None and A.kernel_name("flash_attention_2") == "flash-attn"
    # this machine's torch (2.13) ships the kernel; the GPU machine's 2.11 too (since 2.10)
    assert A.torch_varlen_attn() is not None


def _assert_grads_close(got, want):
    assert set(got) == set(want)
    for n in want:
        scale = want[n].abs().max().clamp_min(1e-12)
        assert (got[n] - want[n]).abs().max() <= GRAD_RTOL * scale, n


@pytest.mark.parametrize("name", PRESETS)
def test_packed_varlen_equals_padded_sdpa_with_engine(name):
    padded = tiny(name)
    packed = tiny(name)
    A.apply_attention(packed.model, A.VARLEN_IMPL)
    assert packed.adapter.attn_implementation == A.VARLEN_IMPL
    samples = [padded.adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=2, seed=5)
    seen: list = []
    real = A.varlen_attention_forward

    def spy(module, q, k, v, mask, **kw):
        seen.append((mask, kw.get("cu_seq_lens_q")))
        return real(module, q, k, v, mask, **kw)

    from transformers import AttentionInterface

    AttentionInterface.register(A.VARLEN_IMPL, spy)
    try:
        b_v, out_v, g_v, n_v, c_v, rw_v = _engine_run(packed, samples, keeps, rows, "auto")
    finally:
        A.register()
    b_p, out_p, g_p, n_p, c_p, rw_p = _engine_run(padded, samples, keeps, rows, "auto")
    assert b_v.layout == "packed" and b_p.layout == "padded"
    n_layers = packed.adapter.language_model.config.num_hidden_layers
    packed_calls = [s for s in seen if s[1] is not None]
    assert len(packed_calls) == n_layers  # every decoder layer, none of the vision tower's
    assert all(m is None and torch.equal(cu.cpu(), b_v.cu_seqlens.cpu()) for m, cu in packed_calls)
    assert A.last_kernel() == A.REFERENCE_KERNEL
    torch.testing.assert_close(out_v.loss_sum, out_p.loss_sum, rtol=LOSS_RTOL, atol=0)
    _assert_grads_close(g_v, g_p)
    _assert_grads_close(rw_v, rw_p)
    torch.testing.assert_close(n_v, n_p, rtol=1e-4, atol=0)
    torch.testing.assert_close(c_v, c_p, rtol=0, atol=1e-5)
    assert b_v.n_kept == b_p.n_kept and b_v.max_seqlen == b_p.max_seqlen


def test_generation_path_unchanged_by_varlen():
    """Without packed rows (a left-padded batch, the vision tower) the registered function is
    transformers' SDPA with SDPA's mask: the model's own loss is the same."""
    sd = tiny("tiny-llava", lora=False)
    vl = tiny("tiny-llava", lora=False)
    A.apply_attention(vl.model, A.VARLEN_IMPL)
    s = [sd.adapter.encode(r) for r in records()[:2]]
    n = max(x.length for x in s)
    ids = torch.full((2, n), sd.adapter.pad_token_id)
    mask = torch.zeros(2, n, dtype=torch.long)
    for i, x in enumerate(s):  # left padding, as in batched generation
        ids[i, n - x.length :] = x.input_ids
        mask[i, n - x.length :] = 1
    kw = sd.adapter.generation_kwargs(s, ids)
    with torch.no_grad():
        want = sd.adapter.base(input_ids=ids, attention_mask=mask, **kw).logits
        got = vl.adapter.base(input_ids=ids, attention_mask=mask, **kw).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


def test_varlen_rejects_dropout_and_cross_attention():
    q = torch.zeros(1, 2, 4, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="dropout"):
        A.varlen_attention_forward(None, q, q, q, None, dropout=0.1, cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="self-attention"):
        A.varlen_attention_forward(
            None, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 2, 4])
        )


@requires_cuda
def test_torch_kernel_equals_reference_on_cuda():
    """torch's varlen FlashAttention (bf16) against the fp32 reference, forward and backward."""
    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 37, 38, 300, 555], dtype=torch.int32, device="cuda")
    shape_q, shape_kv = (555, 8, 64), (555, 2, 64)
    q = torch.randn(shape_q, generator=g, device="cuda", requires_grad=True)
    k, v = (torch.randn(shape_kv, generator=g, device="cuda", requires_grad=True) for _ in "kv")
    half = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    got = A.packed_attention(*half, cu, 262, 0.125, A.pick_kernel(half[0]))
    assert A.last_kernel() == A.TORCH_KERNEL
    want = A.varlen_reference(q, k, v, cu, 0.125)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    dout = torch.randn(want.shape, generator=g, device="cuda")
    got.backward(dout.bfloat16())
    want.backward(dout)
    for h, f in zip(half, (q, k, v)):
        torch.testing.assert_close(h.grad.float(), f.grad, rtol=5e-2, atol=5e-2)


@requires_cuda
def test_packed_varlen_equals_padded_on_cuda_bf16():
    """tiny-llava on CUDA under bf16 autocast: the torch kernel runs every decoder layer and
    the per-row losses match padded SDPA rows to bf16 rounding."""
    padded, packed = tiny("tiny-llava"), tiny("tiny-llava")
    for m in (padded, packed):
        m.model.to("cuda")
    A.apply_attention(packed.model, A.VARLEN_IMPL)
    samples = [padded.adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=2, seed=5)
    out = {}
    for name, m in (("padded", padded), ("packed", packed)):
        batch = collate_rows(m, samples, keeps, rows, layout="auto")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out[name] = forward_rows(m, batch).loss_sum.float()
        assert batch.layout == name
    assert A.last_kernel() == A.TORCH_KERNEL
    torch.testing.assert_close(out["packed"], out["padded"], rtol=2e-2, atol=0)
