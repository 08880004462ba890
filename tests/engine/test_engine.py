"""Per-sample gradient engine: Linear / peft LoRA stacks, padded and packed rows, pairs, reweight.

References: ``aimkp.engine.reference`` (loop of one backward per row on the same graph, and
torch.func vmap over grad). fp32 tolerance: relative error <= 1e-4 on norms, dots and cosines
(the engine accumulates in fp32 with a different summation order than the reference's float64
reductions of fp32 per-row gradients).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aimkp
from aimkp.engine.reference import gram_from_grads, loop_per_row_grads, vmap_per_row_grads
from tests.helpers.engine import (
    MLP,
    PAIRS,
    assert_close_rel,
    check_against_loop,
    flat_grads,
    lora_mlp,
    row_loss_padded,
    run_engine,
)


@pytest.mark.parametrize("form", ["auto", "direct", "ghost"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_stack_3d_vs_vmap_and_loop(form: str, bias: bool) -> None:
    m = MLP(bias=bias)
    x = torch.randn(4, 7, 12)
    gram, G = check_against_loop(m, lambda: row_loss_padded(m(x)), PAIRS, form=form)
    assert gram.backend == "torch"
    assert set(gram.layers) == {"up", "down", "head"}
    if form != "auto":
        assert all(v == f"torch/{form}" for v in gram.layers.values())
    Gv = vmap_per_row_grads(m, lambda call, xr: row_loss_padded(call(xr)).sum(), x)
    assert_close_rel(G, Gv, rtol=1e-5)


def test_linear_2d_inputs() -> None:
    m = MLP()
    x = torch.randn(5, 12)
    check_against_loop(m, lambda: (m(x).square() + m(x)).sum(-1), torch.tensor([[0, 4], [1, 2]]))


def test_lora_padded_with_mask_and_dropout() -> None:
    m = lora_mlp(dropout=0.25)
    m.train()
    x = torch.randn(4, 9, 12)
    mask = torch.ones(4, 9)
    mask[1, 5:] = 0  # padding: zero output gradient, nothing special needed
    mask[3, :] = 0  # an all-masked row: norm 0, cosine 0
    gram, _ = check_against_loop(m, lambda: row_loss_padded(m(x), mask), PAIRS)
    assert gram.norms[3] == 0 and gram.cosines[2] == 0


def test_lora_packed_rows() -> None:
    torch.manual_seed(1)
    m = lora_mlp()
    lens = [5, 1, 8, 3]
    cu = torch.tensor([0, 5, 6, 14, 17])
    x = torch.randn(1, 17, 12)
    seg = torch.repeat_interleave(torch.arange(4), torch.tensor(lens))

    def fwd():
        tok = (m(x).square() + m(x)).sum(-1)[0]  # [17]; m called twice: shared weights
        return torch.zeros(4).index_add(0, seg, tok)

    check_against_loop(m, fwd, PAIRS, cu_seqlens=cu)
    # the same rows padded give the same numbers
    gram_p, _ = run_engine(m, fwd, PAIRS, cu_seqlens=cu)
    xp = torch.zeros(4, 8, 12)
    mask = torch.zeros(4, 8)
    for r in range(4):
        xp[r, : lens[r]] = x[0, cu[r] : cu[r + 1]]
        mask[r, : lens[r]] = 1
    gram_d, _ = run_engine(
        m,
        lambda: ((m(xp).square() + m(xp)).sum(-1) * mask).sum(-1),
        PAIRS,
    )
    assert_close_rel(gram_p.norms, gram_d.norms)
    assert_close_rel(gram_p.dots, gram_d.dots)


def test_set_rows_inside_context() -> None:
    m = lora_mlp()
    x = torch.randn(1, 10, 12)
    seg = torch.tensor([0] * 4 + [1] * 6)
    with aimkp.per_sample_grad_gram(m, pairs=torch.tensor([[0, 1]])) as gram:
        tok = m(x).sum(-1)[0]
        loss = torch.zeros(2).index_add(0, seg, tok)
        gram.set_rows(cu_seqlens=torch.tensor([0, 4, 10]))
        loss.sum().backward()
    m.zero_grad()
    loss = torch.zeros(2).index_add(0, seg, m(x).sum(-1)[0])
    norms, dots, _ = gram_from_grads(loop_per_row_grads(m, loss), torch.tensor([[0, 1]]))
    assert_close_rel(gram.norms, norms)
    assert_close_rel(gram.dots, dots)


@pytest.mark.parametrize("storage", ["auto", "tokens", "rows"])
@pytest.mark.parametrize("scale", [[1.0, 0.0, 2.5, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0] * 4])
def test_reweight_exact_with_grad_accumulation(scale: list[float], storage: str) -> None:
    m = lora_mlp(dropout=0.1)
    x0 = torch.randn(4, 6, 12)
    x = torch.randn(4, 6, 12)
    row_loss_padded(m(x0)).sum().backward()  # an earlier micro-step
    before = flat_grads(m).clone()
    torch.manual_seed(5)
    with aimkp.per_sample_grad_gram(
        m, pairs=PAIRS, keep_for_reweight=True, reweight_storage=storage
    ) as gram:
        loss = row_loss_padded(m(x))
        loss.sum().backward()
    gram.reweight(torch.tensor(scale))
    got = flat_grads(m) - before
    m.zero_grad()
    torch.manual_seed(5)  # same dropout masks
    G = loop_per_row_grads(m, row_loss_padded(m(x)))
    want = (torch.tensor(scale)[:, None] * G).sum(0)
    assert_close_rel(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="already"):
        gram.reweight(torch.ones(4))


def test_no_grad_region_and_unused_call() -> None:
    m = MLP()
    x = torch.randn(3, 4, 12)
    with aimkp.per_sample_grad_gram(m) as gram:
        with torch.no_grad():
            m(x)  # ignored by the hooks
        _ = m(x * 2)  # called, never reaches the loss
        loss = row_loss_padded(m(x))
        loss.sum().backward()
    m.zero_grad()
    norms, _, _ = gram_from_grads(loop_per_row_grads(m, row_loss_padded(m(x))))
    assert_close_rel(gram.norms, norms)


def test_unsupported_module_errors() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.s

    m = nn.Sequential(nn.Linear(3, 3), Scale())
    with pytest.raises(ValueError, match=r"module '1' \(Scale\).*\['s'\]"):
        aimkp.per_sample_grad_gram(m)


def test_bad_arguments() -> None:
    m = MLP()
    with pytest.raises(ValueError, match="backend"):
        aimkp.per_sample_grad_gram(m, backend="cuda")
    with pytest.raises(ValueError, match="cu_seqlens"):
        aimkp.per_sample_grad_gram(m, cu_seqlens=torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="pairs index rows"):
        with aimkp.per_sample_grad_gram(m, pairs=torch.tensor([[0, 5]])):
            m(torch.randn(2, 3, 12)).sum().backward()
    gram = aimkp.per_sample_grad_gram(m)
    with gram:
        pass
    with pytest.raises(ValueError, match="no backward"):
        _ = gram.norms
    x = torch.randn(1, 5, 12)
    with pytest.raises(ValueError, match="map to no rows"):
        with aimkp.per_sample_grad_gram(m, cu_seqlens=torch.tensor([0, 2, 4])):
            m(x).sum().backward()


def test_functional_use_error() -> None:
    # (tied weights, one parameter owned by two modules, are covered in test_engine_tied.py)
    lin = nn.Linear(3, 2)
    model = nn.Sequential(lin, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no call of the module was seen"):
        with aimkp.per_sample_grad_gram(model):
            out = nn.functional.linear(torch.randn(4, 3), lin.weight, lin.bias)  # not lin(x)
            model[1](out).sum(1).sum().backward()


def test_activation_checkpointing_non_reentrant() -> None:
    from torch.utils.checkpoint import checkpoint

    m = lora_mlp(dropout=0.2)
    x = torch.randn(4, 5, 12)

    def fwd() -> torch.Tensor:
        return row_loss_padded(checkpoint(m, x, use_reentrant=False))

    check_against_loop(m, fwd, PAIRS)
    with pytest.raises(ValueError, match="no call of the module was seen"):
        with aimkp.per_sample_grad_gram(m):
            x.requires_grad_(True)
            row_loss_padded(checkpoint(m, x, use_reentrant=True)).sum().backward()


@pytest.mark.parametrize("form", ["direct", "ghost"])
def test_empty_batch(form: str) -> None:
    emb = nn.Embedding(5, 3)
    m = nn.Sequential(emb, nn.LayerNorm(3), nn.Linear(3, 2))
    pairs = torch.zeros(0, 2, dtype=torch.long)
    with aimkp.per_sample_grad_gram(m, pairs=pairs, num_rows=0, form=form) as gram:
        m(torch.zeros(0, 4, dtype=torch.long)).sum().backward()
    assert gram.norms.shape == (0,) and gram.dots.shape == (0,) and gram.cosines.shape == (0,)


def test_under_torch_compile() -> None:
    """The hooks see the right quantities when the model runs through torch.compile (dynamo
    breaks the graph at the hooks; the numbers must still be the per-row loop's)."""
    m = MLP()
    mc = torch.compile(m)
    x = torch.randn(4, 5, 12)
    check_against_loop(m, lambda: row_loss_padded(mc(x)), PAIRS)
