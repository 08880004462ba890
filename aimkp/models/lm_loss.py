"""Per-row answer losses through the LM head, in token chunks: no ``[answer tokens, vocabulary]``
fp32 logits tensor, softmax or logits gradient exists whole.

The eager head (``F.cross_entropy(lm_head(h).float(), targets, reduction="none")``) keeps, at
``A`` answer positions and a vocabulary ``V``, the ``[A, V]`` logits (in the compute dtype and in
fp32), the cross-entropy's log-softmax for the backward, and in the backward the ``[A, V]``
logits gradient: at Qwen2-VL's 152,064 words that is 0.6 MB per answer token per tensor.
:class:`ChunkedLinearCrossEntropy` computes, per chunk of answer tokens, the logits, their
logsumexp and the target logit (kept: 8 bytes per token), and in the backward recomputes each
chunk's softmax to produce the gradient of the hidden states and, where the head's weight
(or bias) is trainable, of the weight: only one chunk's ``[chunk, V]`` exists at a time.

It rounds as the eager head does: the matrix product runs in the dtype the eager head's runs in
(autocast's, where autocast is on for the device; else the weight's), the logits are then
upcast to fp32, and the logits gradient is rounded to that dtype before the products of the
backward, as autograd's linear backward does. Fused kernels (Liger's
FusedLinearCrossEntropy, Apple's cut-cross-entropy) do the same fusion on CUDA; aimkp keeps
its own because it needs per-token losses (summed per row) with their exact gradients, which
those kernels give only through their ``reduction="none"`` paths (Liger's has returned wrong
or zero gradients: linkedin/Liger-Kernel#968).

:func:`row_answer_losses` is what :func:`aimkp.models.forward.forward_rows` calls: the chunked
path where the head is a plain ``nn.Linear`` with no trainable parameter (every LoRA run: the
per-sample gradient engine hooks no module without trainable parameters, so its norms and
cosines never involve the head), the eager module call otherwise (a trainable head - full
fine-tuning, a trainable tied embedding - is one the engine hooks as a ``Linear`` and needs its
``[A, V]`` output gradients at the module).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# fp32 logits per chunk: 64 MiB (at V = 152,064: 110 answer tokens per chunk)
CHUNK_BYTES = 64 * 2**20
_EAGER: contextvars.ContextVar[bool] = contextvars.ContextVar("aimkp_eager_lm_loss", default=False)


@contextlib.contextmanager
def eager_lm_loss() -> Iterator[None]:
    """Inside: :func:`row_answer_losses` calls the head module and ``F.cross_entropy`` (the
    reference the chunked path is tested against; benchmarks compare the two)."""
    token = _EAGER.set(True)
    try:
        yield
    finally:
        _EAGER.reset(token)


def chunk_tokens(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Answer tokens per chunk: as many fp32 logits rows as ``chunk_bytes`` holds (>= 1)."""
    return max(1, chunk_bytes // (4 * max(1, vocab)))


def _compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.linear(h, weight)`` computes in here: autocast's where it is on."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 logits, as the eager head's ``.float()`` (fp64 stays fp64: gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``ce[a] = logsumexp(logits[a]) - logits[a, targets[a]]`` with ``logits = h @ W.T (+ b)``
    (fp32), computed ``chunk`` rows of ``h`` at a time; see the module doc."""

    @staticmethod
    def forward(
        ctx: Any,  # torch's FunctionCtx stubs declare none of the attributes a Function sets
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk: int,
    ) -> Tensor:
        dtype = _compute_dtype(h, weight)
        acc = _acc_dtype(dtype)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        ce = torch.empty(h.shape[0], dtype=acc, device=h.device)
        lse = torch.empty_like(ce)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                logits = F.linear(h[s : s + chunk].to(dtype), w, b).to(acc)
                lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
                tgt = logits.gather(1, targets[s : s + chunk, None]).squeeze(1)
                ce[s : s + chunk] = lse[s : s + chunk] - tgt
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.dtype, ctx.chunk = dtype, chunk
        return ce

    @staticmethod
    def backward(ctx: Any, grad_ce: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, bias, targets, lse = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _acc_dtype(dtype)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(h) if need_h else None
        # the weight's gradient summed over chunks in fp32 (acc), rounded once at the end
        # (autograd's linear backward takes one product over all tokens: equal up to rounding)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if need_b else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                hc = h[s : s + chunk].to(dtype)
                logits = F.linear(hc, w, b).to(acc)
                # d ce / d logits = softmax - onehot(target), times the upstream gradient
                g = torch.exp_(logits.sub_(lse[s : s + chunk, None]))
                g[torch.arange(g.shape[0], device=g.device), targets[s : s + chunk]] -= 1
                g.mul_(grad_ce[s : s + chunk, None])
                g = g.to(dtype)  # the logits gradient in the product's dtype, as autograd's
                if grad_h is not None:
                    grad_h[s : s + chunk] = (g @ w).to(h.dtype)
                if grad_w is not None:
                    grad_w.addmm_(g.t().to(acc), hc.to(acc))
                if grad_b is not None:
                    grad_b.add_(g.to(acc).sum(0))
        gw = None if grad_w is None else grad_w.to(weight.dtype)
        gb = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, gw, gb, None, None


def linear_cross_entropy(
    h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int | None = None
) -> Tensor:
    """Per-token cross-entropy ``[A]`` (fp32) of ``F.linear(h, weight, bias)`` against
    ``targets``, in chunks of ``chunk`` tokens (default: :func:`chunk_tokens`)."""
    if h.ndim != 2 or targets.shape != h.shape[:1]:
        raise ValueError(
            f"h must be [A, D] and targets [A], got {tuple(h.shape)} and {tuple(targets.shape)}"
        )
    n = chunk if chunk is not None else chunk_tokens(weight.shape[0])
    return ChunkedLinearCrossEntropy.apply(h, weight, bias, targets, n)


def uses_chunked_head(head: nn.Module) -> bool:
    """Whether :func:`row_answer_losses` takes the chunked path for ``head``: a plain
    ``nn.Linear`` with no trainable parameter, outside :func:`eager_lm_loss`."""
    return (
        not _EAGER.get()
        and type(head) is nn.Linear
        and not any(p.requires_grad for p in head.parameters())
    )


def row_answer_losses(
    head: nn.Module, h: Tensor, targets: Tensor, rows: Tensor, num_rows: int
) -> Tensor:
    """``loss_sum [num_rows]`` (fp32): per row, the summed cross-entropy of its answer tokens
    (``h [A, D]`` the hidden states predicting them, ``rows [A]`` their rows)."""
    if uses_chunked_head(head):
        assert isinstance(head, nn.Linear)  # uses_chunked_head checked it
        ce = linear_cross_entropy(h, head.weight, head.bias, targets)
    else:
        ce = F.cross_entropy(head(h).float(), targets, reduction="none")
    loss_sum = torch.zeros(num_rows, dtype=torch.float32, device=ce.device)
    return loss_sum.index_add(0, rows, ce)
