"""Per-sample gradient engine with a non-finite row (a NaN loss in one masked copy).

Wanted: norms / dots / cosines involving the row are NaN (never a finite number), ``finite_rows``
is False for it, and ``reweight`` with a scale of 0 for it leaves every ``.grad`` finite and equal
to a backward over the other rows only (with an earlier accumulated ``.grad`` too). The other rows'
numbers are those of the per-row loop reference. Tolerances: fp32, max error 1e-5 times the
gradient tensor's largest entry (the reweight sums the kept rows' stashed contributions in another
order than the backward, and its ``(s - 1) G_r`` updates cancel part of ``.grad``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aimkp
from aimkp.engine.reference import gram_from_grads, loop_per_row_grads

PAIRS = torch.tensor([[0, 1], [1, 2], [0, 2], [3, 0]])
BAD = 1  # the row whose loss is NaN


class Tiny(nn.Module):
    """Embedding -> LayerNorm -> Linear -> RMSNorm -> Linear: one layer of each rule."""

    def __init__(self, v: int = 11, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.ln = nn.LayerNorm(d)
        self.up = nn.Linear(d, 8)
        self.rms = nn.RMSNorm(8, eps=1e-6)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rms(torch.tanh(self.up(self.ln(self.emb(ids))))))


def _row_loss(model: nn.Module, ids: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
    out = model(ids)  # [B, T, 3]
    return (out.square() + out).sum((1, 2)) * poison


def _poison(b: int) -> torch.Tensor:
    p = torch.ones(b)
    p[BAD] = float("nan")
    return p


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _clean_grads(model: nn.Module, ids: torch.Tensor, scale: torch.Tensor) -> list[torch.Tensor]:
    """``.grad`` after a backward of ``sum_r scale_r loss_r`` over the rows with scale != 0."""
    keep = scale != 0
    loss = _row_loss(model, ids[keep], torch.ones(int(keep.sum())))
    (loss * scale[keep]).sum().backward()
    return _grads(model)


def _assert_grads_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        # relative to the tensor's scale: the reweight's (s - 1) G_r updates cancel part of .grad
        err = (g - w).abs().max().item() if g.numel() else 0.0
        assert err <= 1e-5 * max(w.abs().max().item(), 1e-6), err


def _run(model, ids, backend="auto", storage="auto", keep=True):
    with aimkp.per_sample_grad_gram(
        model, pairs=PAIRS, keep_for_reweight=keep, backend=backend, reweight_storage=storage
    ) as gram:
        _row_loss(model, ids, _poison(ids.shape[0])).sum().backward()
    return gram


def test_nan_row_gives_nan_norm_dots_and_cosines_and_exact_others() -> None:
    torch.manual_seed(0)
    m = Tiny()
    ids = torch.randint(0, 11, (4, 5))
    gram = _run(m, ids, keep=False)
    assert gram.finite_rows().tolist() == [True, False, True, True]
    involved = (PAIRS == BAD).any(1)
    assert torch.isnan(gram.norms[BAD])
    assert torch.isnan(gram.dots[involved]).all() and torch.isnan(gram.cosines[involved]).all()
    m.zero_grad(set_to_none=True)
    ref = loop_per_row_grads(m, _row_loss(m, ids, torch.ones(4)))
    norms, dots, cos = gram_from_grads(ref, PAIRS)
    ok = ~involved
    torch.testing.assert_close(gram.cosines[ok], cos[ok].float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gram.dots[ok], dots[ok].float(), rtol=1e-4, atol=1e-6)
    fine = torch.tensor([0, 2, 3])
    torch.testing.assert_close(gram.norms[fine], norms[fine].float(), rtol=1e-4, atol=1e-6)


def test_inf_row_gives_nan_cosines_not_zero() -> None:
    torch.manual_seed(1)
    m = Tiny()
    ids = torch.randint(0, 11, (4, 5))
    with aimkp.per_sample_grad_gram(m, pairs=PAIRS) as gram:
        scale = torch.ones(4)
        scale[BAD] = float("inf")
        _row_loss(m, ids, scale).sum().backward()
    assert not gram.finite_rows()[BAD]
    assert torch.isnan(gram.cosines[(PAIRS == BAD).any(1)]).all()


@pytest.mark.parametrize("storage", ["tokens", "rows", "auto"])
@pytest.mark.parametrize("accumulated", [False, True])
def test_reweight_zero_removes_nan_row_exactly(storage: str, accumulated: bool) -> None:
    torch.manual_seed(2)
    m = Tiny()
    ids = torch.randint(0, 11, (4, 5))
    scale = torch.tensor([0.5, 0.0, 2.0, 1.0])
    m.zero_grad(set_to_none=True)
    if accumulated:  # an earlier micro-step's gradient stays exactly in .grad
        _row_loss(m, torch.randint(0, 11, (2, 5)), torch.ones(2)).sum().backward()
    before = [p.grad.clone() if p.grad is not None else None for p in m.parameters()]
    gram = _run(m, ids, storage=storage)
    assert not all(torch.isfinite(p.grad).all() for p in m.parameters())  # NaN reached .grad
    gram.reweight(scale)
    got = _grads(m)
    for p, b in zip(m.parameters(), before):
        p.grad = b.clone() if b is not None else None
    _assert_grads_equal(got, _clean_grads(m, ids, scale))


def test_reweight_all_finite_path_unchanged_by_snapshot() -> None:
    """Finite rows: reweight adds ``(s - 1) G_r`` to .grad (accumulated content kept)."""
    torch.manual_seed(3)
    m = Tiny()
    ids = torch.randint(0, 11, (4, 5))
    m.zero_grad(set_to_none=True)
    _row_loss(m, ids[:2], torch.ones(2)).sum().backward()
    before = _grads(m)
    with aimkp.per_sample_grad_gram(m, pairs=PAIRS, keep_for_reweight=True) as gram:
        _row_loss(m, ids, torch.ones(4)).sum().backward()
    scale = torch.tensor([0.0, 1.0, 3.0, 0.25])
    gram.reweight(scale)
    got = _grads(m)
    for p, b in zip(m.parameters(), before):
        p.grad = b.clone()
    _assert_grads_equal(got, _clean_grads(m, ids, scale))


def test_reweight_nan_row_triton_interpreter() -> None:
    """The Triton grad-gram kernels (interpreted on the CPU) propagate the NaN row the same way;
    a LoRA-free Linear stack keeps the kernels involved for every layer."""
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(4, 3, 6)

    def loss_of(xs: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
        return m(xs).square().sum((1, 2)) * poison

    with aimkp.per_sample_grad_gram(
        m, pairs=PAIRS, keep_for_reweight=True, backend="triton"
    ) as gram:
        loss_of(x, _poison(4)).sum().backward()
    assert gram.backend == "triton"
    assert gram.finite_rows().tolist() == [True, False, True, True]
    assert torch.isnan(gram.cosines[(PAIRS == BAD).any(1)]).all()
    assert torch.isfinite(gram.cosines[~(PAIRS == BAD).any(1)]).all()
    scale = torch.tensor([1.0, 0.0, 1.0, 1.0])
    gram.reweight(scale)
    got = _grads(m)
    m.zero_grad(set_to_none=True)
    loss_of(x[scale != 0], torch.ones(3)).sum().backward()
    _assert_grads_equal(got, _grads(m))


def test_without_grad_copy_nan_row_needs_empty_grad() -> None:
    """keep_grad_before=False: exact when .grad was None on entering, a ValueError (and .grad
    untouched) when an earlier gradient would be needed."""
    torch.manual_seed(5)
    m = Tiny()
    ids = torch.randint(0, 11, (4, 5))
    scale = torch.tensor([1.0, 0.0, 1.0, 1.0])

    def run():
        with aimkp.per_sample_grad_gram(
            m, pairs=PAIRS, keep_for_reweight=True, keep_grad_before=False
        ) as gram:
            _row_loss(m, ids, _poison(4)).sum().backward()
        return gram

    m.zero_grad(set_to_none=True)
    run().reweight(scale)
    got = _grads(m)
    m.zero_grad(set_to_none=True)
    _assert_grads_equal(got, _clean_grads(m, ids, scale))
    gram = run()  # .grad now holds the clean gradient from above
    with pytest.raises(ValueError, match="keep_grad_before"):
        gram.reweight(scale)


def test_reweight_zero_removes_nan_row_with_tied_weights() -> None:
    """An embedding table tied to the head: both owners' stashes rebuild the one .grad."""
    torch.manual_seed(6)
    emb = nn.Embedding(11, 6)
    head = nn.Linear(6, 11, bias=False)
    head.weight = emb.weight
    m = nn.ModuleDict({"emb": emb, "head": head})
    ids = torch.randint(0, 11, (4, 5))

    def loss_of(i: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
        return m["head"](torch.tanh(m["emb"](i))).square().sum((1, 2)) * poison

    m.zero_grad(set_to_none=True)
    loss_of(ids[:2], torch.ones(2)).sum().backward()  # an earlier micro-step
    before = emb.weight.grad.clone()
    with aimkp.per_sample_grad_gram(m, pairs=PAIRS, keep_for_reweight=True) as gram:
        loss_of(ids, _poison(4)).sum().backward()
    assert gram.finite_rows().tolist() == [True, False, True, True]
    scale = torch.tensor([2.0, 0.0, 1.0, 0.5])
    gram.reweight(scale)
    got = emb.weight.grad.clone()
    emb.weight.grad = before
    keep = scale != 0
    (loss_of(ids[keep], torch.ones(3)) * scale[keep]).sum().backward()
    _assert_grads_equal([got], [emb.weight.grad])
