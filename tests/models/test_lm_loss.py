"""The chunked LM head + cross-entropy (aimkp/models/lm_loss.py) against the eager head: per-token
losses and every gradient (hidden states, weight, bias, a tied input embedding), in the row
forward and under the per-sample gradient engine (norms, cosines, reweight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aimkp.models.lm_loss import (
    chunk_tokens,
    eager_lm_loss,
    linear_cross_entropy,
    row_answer_losses,
    uses_chunked_head,
)
from tests.helpers.cuda import requires_cuda
from tests.helpers.models import (
    random_keeps,
    records,
    tiny,
)
from tests.helpers.rows import GRAD_RTOL, LOSS_RTOL, engine_run_rows, run_rows

A, D, V = 13, 16, 50


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(A, D, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.1).requires_grad_()
    t = torch.randint(0, V, (A,), generator=g)
    up = torch.rand(A, generator=g, dtype=torch.float32)
    up[3] = 0.0  # a token whose loss weight is zero (a dropped copy)
    return h, w, b, t, up


def _grads(loss: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, xs))


@pytest.mark.parametrize("chunk", [1, 4, A, A + 7])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_equals_eager_losses_and_gradients(chunk, bias):
    h, w, b, t, up = _inputs()
    b = b if bias else None
    want = F.cross_entropy(F.linear(h, w, b).float(), t, reduction="none")
    got = linear_cross_entropy(h, w, b, t, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    xs = [h, w] + ([b] if bias else [])
    for g_got, g_want in zip(_grads((got * up).sum(), *xs), _grads((want * up).sum(), *xs)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    h, w, b, t, _ = _inputs(dtype=torch.float64)
    f = lambda h, w, b: linear_cross_entropy(h, w, b, t, chunk=5)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-6)


def test_tied_input_embedding_gradient():
    """One table as input embedding and head: its gradient sums both uses, as eager's does."""
    g = torch.Generator().manual_seed(3)
    table = (torch.randn(V, D, generator=g) * 0.5).requires_grad_()
    mix = (torch.randn(D, D, generator=g) / D**0.5).requires_grad_()
    ids = torch.randint(0, V, (A,), generator=g)
    t = torch.randint(0, V, (A,), generator=g)

    def loss(chunked: bool) -> torch.Tensor:
        h = torch.tanh(F.embedding(ids, table) @ mix)
        if chunked:
            return linear_cross_entropy(h, table, None, t, chunk=3).sum()
        return F.cross_entropy(F.linear(h, table).float(), t, reduction="sum")

    for g_got, g_want in zip(_grads(loss(True), table, mix), _grads(loss(False), table, mix)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_rounds_as_the_eager_head():
    """Under autocast the product runs in bf16 and the logits are upcast, as the eager head's."""
    h, w, _, t, up = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w).float(), t, reduction="none")
        got = linear_cross_entropy(h, w, None, t, chunk=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g_got, g_want in zip(_grads((got * up).sum(), h, w), _grads((want * up).sum(), h, w)):
        torch.testing.assert_close(g_got, g_want, rtol=2e-2, atol=2e-3)


def test_row_sums_and_empty_rows():
    h, w, _, t, _ = _inputs()
    head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(w)
    head.requires_grad_(False)
    rows = torch.tensor([0] * 5 + [2] * 8)
    assert uses_chunked_head(head)
    got = row_answer_losses(head, h, t, rows, 4)
    with eager_lm_loss():
        assert not uses_chunked_head(head)
        want = row_answer_losses(head, h, t, rows, 4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got[1] == 0 and got[3] == 0  # rows without answer tokens
    empty = row_answer_losses(head, h[:0], t[:0], rows[:0], 2)
    assert empty.shape == (2,) and not empty.any()
    head.weight.requires_grad_(True)  # a trainable head: the module call (the engine hooks it)
    assert not uses_chunked_head(head)


def test_chunk_tokens():
    assert chunk_tokens(152_064) == 110
    assert chunk_tokens(10**12) == 1


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2vl"])
def test_row_forward_equals_eager_head(name):
    loaded = tiny(name)
    assert uses_chunked_head(loaded.adapter.lm_head)  # LoRA: the head is frozen
    samples = [loaded.adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=2)
    _, out, grads = run_rows(loaded, samples, keeps, rows, "compact")
    with eager_lm_loss():
        _, out_e, grads_e = run_rows(loaded, samples, keeps, rows, "compact")
    torch.testing.assert_close(out.loss_sum, out_e.loss_sum, rtol=LOSS_RTOL, atol=0)
    assert grads.keys() == grads_e.keys() and grads
    for n, g in grads.items():
        scale = grads_e[n].abs().max()
        torch.testing.assert_close(g, grads_e[n], rtol=0, atol=GRAD_RTOL * float(scale))


def test_engine_norms_cosines_and_reweight_equal_eager_head():
    loaded = tiny("tiny-llava")
    samples = [loaded.adapter.encode(r) for r in records()]
    keeps, rows = random_keeps(samples, copies=2)
    got = engine_run_rows(loaded, samples, keeps, rows, "packed")
    with eager_lm_loss():
        want = engine_run_rows(loaded, samples, keeps, rows, "packed")
    torch.testing.assert_close(got[1].loss_sum, want[1].loss_sum, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(got[3], want[3], rtol=GRAD_RTOL, atol=0)  # norms
    torch.testing.assert_close(got[4], want[4], rtol=0, atol=GRAD_RTOL)  # cosines
    for a, b in ((got[2], want[2]), (got[5], want[5])):  # grads, reweighted grads
        for n, g in a.items():
            scale = b[n].abs().max()
            torch.testing.assert_close(g, b[n], rtol=0, atol=GRAD_RTOL * float(scale))


@requires_cuda
def test_cuda_bf16_head_equals_eager_and_keeps_no_full_logits():
    """On CUDA under bf16 autocast, at a 7B-sized vocabulary: the losses and the hidden-state
    gradient of the eager head, and an allocator peak under one ``[A, V]`` fp32 tensor."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a, d, v = 512, 1024, 152_064
    h = torch.randn(a, d, device="cuda", generator=g).requires_grad_()
    w = torch.randn(v, d, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    t = torch.randint(0, v, (a,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w).float(), t, reduction="none")
    (g_want,) = torch.autograd.grad(want.sum(), h)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, None, t)
    (g_got,) = torch.autograd.grad(got.sum(), h)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_got, g_want, rtol=2e-2, atol=2e-3)
    assert peak < a * v * 4, peak  # less than one [A, V] fp32 tensor (eager holds three)
