"""Per-sample gradient engine: the other rules (Embedding, LayerNorm, RMSNorm incl. the
transformers class), the Triton kernels (under TRITON_INTERPRET=1 on CPU), bf16 / fp16 activations,
and hypothesis-drawn shapes for the row / hook logic.

Tolerances: fp32 relative error <= 1e-4 (see tests/helpers/engine.py). Low precision: the engine
reads bf16 / fp16 layer inputs and output gradients and accumulates in fp32; its error against the
fp32 model's exact per-row numbers must be at most 2x that of the same per-row loop run in the low
precision (flash-attention's rule), plus 1e-3 of the scale for rounding noise in near-zero entries.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import aimkp
from aimkp.engine.reference import gram_from_grads, loop_per_row_grads
from tests.helpers.engine import (
    PAIRS,
    assert_close_rel,
    check_against_loop,
    lora_mlp,
    row_loss_padded,
)


class EmbNormNet(nn.Module):
    """Embedding -> LayerNorm -> Linear -> RMSNorm -> Linear, all trainable."""

    def __init__(self, rms: nn.Module | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.ln = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 6)
        self.rms = rms if rms is not None else nn.RMSNorm(6, eps=1e-5)
        self.head = nn.Linear(6, 4)
        with torch.no_grad():
            self.ln.weight.normal_(1, 0.3)
            self.ln.bias.normal_(0, 0.3)
            self.rms.weight.normal_(1, 0.3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rms(self.lin(self.ln(self.emb(ids)))))


def test_embedding_layernorm_rmsnorm_padded() -> None:
    m = EmbNormNet()
    ids = torch.randint(0, 11, (4, 9))
    ids[0, :3] = 10  # repeated ids, the last table row
    ids[1, :2] = 10  # shared with row 0 (pair (0, 1) has a shared id)
    ids[2, 4:] = 0  # padding ids: no embedding gradient
    check_against_loop(m, lambda: row_loss_padded(m(ids)), PAIRS)


def test_transformers_rmsnorm_class_and_packed() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    m = EmbNormNet(rms=LlamaRMSNorm(6, eps=1e-6))
    assert type(aimkp.engine.get_rule(m.rms)).__name__ == "RMSNormRule"
    ids = torch.randint(1, 11, (1, 15))
    cu = torch.tensor([0, 4, 4, 11, 15])  # an empty row
    seg = torch.repeat_interleave(torch.arange(4), cu[1:] - cu[:-1])

    def fwd() -> torch.Tensor:
        return torch.zeros(4).index_add(0, seg, (m(ids).square() + m(ids)).sum(-1)[0])

    check_against_loop(m, fwd, PAIRS, cu_seqlens=cu)


def test_frozen_weight_trainable_bias() -> None:
    m = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 2))
    m[0].weight.requires_grad_(False)
    x = torch.randn(3, 4, 5)
    check_against_loop(m, lambda: row_loss_padded(m(x)), torch.tensor([[0, 1], [1, 2]]))


@pytest.mark.parametrize("form", ["direct", "ghost"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_odd_shapes(dtype: torch.dtype, form: str) -> None:
    from aimkp.kernels import grad_gram as kernels

    kernel = getattr(kernels, f"grad_gram_{form}")
    torch.manual_seed(0)
    # direct: 2 x 2 tiles of 128. ghost: rows of 70 and 75 tokens are 2 blocks of 64 (the
    # symmetric off-diagonal block of a norm, blocks past a row's end), d_in and d_out not
    # multiples of the feature block. Token counts not multiples of the token block.
    N, d_in, d_out = 150, 130, 150
    a, g = torch.randn(N, d_in).to(dtype), torch.randn(N, d_out).to(dtype)
    off = torch.tensor([0, 5, 5, 75, 150])  # an empty row
    pairs = torch.tensor([[0, 2], [1, 3], [3, 3], [2, 0], [2, 3], [3, 2]])
    sq, dots = kernel(a, g, off, pairs)
    a, g = a.double(), g.double()  # the kernel upcasts bf16 inputs exactly and sums in fp32
    G = torch.stack([g[off[r] : off[r + 1]].T @ a[off[r] : off[r + 1]] for r in range(4)])
    assert_close_rel(sq, G.square().sum((1, 2)))
    assert_close_rel(dots, (G[pairs[:, 0]] * G[pairs[:, 1]]).sum((1, 2)))
    assert kernel(a.float(), g.float(), off, None)[1] is None
    # no tokens at all: zeros, no launch
    sq0, dots0 = kernel(a[:0], g[:0], torch.zeros(3, dtype=torch.long), pairs[:1] * 0)
    assert sq0.tolist() == [0.0, 0.0] and dots0.tolist() == [0.0]


@pytest.mark.parametrize("form", ["direct", "ghost"])
def test_triton_backend_lora_packed(form: str) -> None:
    m = lora_mlp()
    x = torch.randn(1, 13, 12)
    cu = torch.tensor([0, 6, 13])
    seg = torch.tensor([0] * 6 + [1] * 7)
    pairs = torch.tensor([[0, 1]])

    def fwd() -> torch.Tensor:
        return torch.zeros(2).index_add(0, seg, (m(x).square() + m(x)).sum(-1)[0])

    gram, _ = check_against_loop(m, fwd, pairs, cu_seqlens=cu, backend="triton", form=form)
    assert gram.backend == "triton"
    assert set(gram.layers.values()) == {f"triton/{form}"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_lora(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    m32 = lora_mlp(r=4, d=16)
    x32 = torch.randn(4, 10, 16)

    def exact() -> torch.Tensor:
        m32.zero_grad()
        return loop_per_row_grads(m32, row_loss_padded(m32(x32)))

    n_ref, d_ref, _ = gram_from_grads(exact(), PAIRS)
    m = lora_mlp(r=4, d=16)
    m.load_state_dict(m32.state_dict())
    m.to(dtype)
    x = x32.to(dtype)
    with aimkp.per_sample_grad_gram(m, pairs=PAIRS) as gram:
        row_loss_padded(m(x)).float().sum().backward()
    assert gram.norms.dtype == torch.float32
    m.zero_grad()
    n_lp, d_lp, _ = gram_from_grads(loop_per_row_grads(m, row_loss_padded(m(x)).float()), PAIRS)
    for got, lp, ref in [(gram.norms, n_lp, n_ref), (gram.dots, d_lp, d_ref)]:
        got, lp = got.double(), lp.double()
        err_engine = (got - ref).abs().max().item()
        err_loop = (lp - ref).abs().max().item()
        assert err_engine <= 2 * err_loop + 1e-3 * ref.abs().max().item(), (err_engine, err_loop)


@settings(max_examples=15, deadline=None)
@given(
    lens=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    packed=st.booleans(),
    form=st.sampled_from(["direct", "ghost"]),
    calls=st.integers(1, 2),
)
def test_hypothesis_rows_and_forms(
    lens: list[int], d_in: int, d_out: int, packed: bool, form: str, calls: int
) -> None:
    B, T = len(lens), max(max(lens), 1)
    lin = nn.Linear(d_in, d_out)
    w = torch.randn(d_out)
    if packed:
        x = torch.randn(1, sum(lens), d_in)
        seg = torch.repeat_interleave(torch.arange(B), torch.tensor(lens))

        def fwd() -> torch.Tensor:
            tok = sum(lin(x * (c + 1)) ** 2 @ w for c in range(calls))[0]
            return torch.zeros(B).index_add(0, seg, tok)

        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        kw = {"cu_seqlens": cu}
    else:
        x = torch.randn(B, T, d_in)
        mask = (torch.arange(T)[None] < torch.tensor(lens)[:, None]).float()

        def fwd() -> torch.Tensor:
            return (sum(lin(x * (c + 1)) ** 2 @ w for c in range(calls)) * mask).sum(1)

        kw = {"num_rows": B}
    pairs = torch.randint(0, B, (3, 2))
    check_against_loop(lin, fwd, pairs, form=form, **kw)


@pytest.mark.parametrize("packed", [False, True])
def test_reweight_embedding_norms_linear(packed: bool) -> None:
    m = EmbNormNet()
    scale = torch.tensor([0.0, 1.0, 3.0, -0.5])
    if packed:
        ids = torch.randint(0, 11, (1, 14))
        cu = torch.tensor([0, 3, 9, 9, 14])
        seg = torch.repeat_interleave(torch.arange(4), cu[1:] - cu[:-1])

        def fwd() -> torch.Tensor:
            return torch.zeros(4).index_add(0, seg, (m(ids).square() + m(ids)).sum(-1)[0])

        kw = {"cu_seqlens": cu}
    else:
        ids = torch.randint(0, 11, (4, 6))

        def fwd() -> torch.Tensor:
            return row_loss_padded(m(ids))

        kw = {}
    with aimkp.per_sample_grad_gram(m, keep_for_reweight=True, **kw) as gram:
        fwd().sum().backward()
    gram.reweight(scale)
    got = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    m.zero_grad()
    want = (scale[:, None] * loop_per_row_grads(m, fwd())).sum(0)
    assert_close_rel(got, want, rtol=1e-5)


def test_rule_docstring_examples() -> None:
    """The tiny examples written in the rules' docstrings give the numbers stated there."""
    # Linear: rows [0, 0, 1], a and g as in aimkp/engine/rules/linear.py
    lin = nn.Linear(2, 1)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    g = torch.tensor([2.0, 3.0, -1.0])
    cu = torch.tensor([0, 2, 3])
    with aimkp.per_sample_grad_gram(lin, pairs=torch.tensor([[0, 1]]), cu_seqlens=cu) as gram:
        (lin(a[None])[0, :, 0] * g).sum().backward()
    # weight 13 + bias 25 for row 0, 2 + 1 for row 1; pair -5 (weight) + -5 (bias)
    assert torch.allclose(gram.sq_norms, torch.tensor([13.0 + 25.0, 2.0 + 1.0]))
    assert torch.allclose(gram.dots, torch.tensor([-10.0]))
    # Embedding: V = 5, row 0 ids [3, 1, 3], row 1 ids [1]
    emb = nn.Embedding(5, 2)
    ids = torch.tensor([[3, 1, 3, 1]])
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [4.0, 0.0]])
    cu = torch.tensor([0, 3, 4])
    with aimkp.per_sample_grad_gram(emb, pairs=torch.tensor([[0, 1]]), cu_seqlens=cu) as gram:
        (emb(ids)[0] * g).sum().backward()
    assert torch.allclose(gram.sq_norms, torch.tensor([9.0, 16.0]))
    assert torch.allclose(gram.dots, torch.tensor([0.0]))
    # RMSNorm: eps = 0, one row of two tokens
    rms = nn.RMSNorm(2, eps=0.0)
    x = torch.tensor([[[3.0, 4.0], [1.0, -1.0]]])
    g = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    with aimkp.per_sample_grad_gram(rms, num_rows=1) as gram:
        (rms(x)[0] * g).sum().backward()
    assert torch.allclose(gram.sq_norms, torch.tensor([12.114]), atol=1e-3)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aimkp.kernels.grad_gram import grad_gram_direct

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        grad_gram_direct(torch.randn(3, 4), torch.randn(3, 2), torch.tensor([0, 3]))
