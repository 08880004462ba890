"""The two references for per-row gradients (used by the tests and the benchmark).

- ``loop_per_row_grads``: the obviously-correct loop, one backward per row with cloned gradients
  (what the AimKP reference code does, per copy).
- ``vmap_per_row_grads``: ``torch.func.vmap`` over ``torch.func.grad`` of one row's loss (exact,
  memory heavy; needs a model without data-dependent Python control flow).
- ``gram_from_grads``: norms / pair dots / cosines from per-row flat gradients ``[B, n]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "trainable_params",
    "loop_per_row_grads",
    "vmap_per_row_grads",
    "gram_from_grads",
]


def trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter with ``requires_grad``, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def loop_per_row_grads(model: nn.Module, per_row_loss: torch.Tensor) -> torch.Tensor:
    """Per-row gradients ``[B, n]`` (float32, flattened over the trainable parameters in module
    order) by one ``backward`` of ``per_row_loss[r]`` per row on the retained graph, cloning
    ``.grad`` after each. ``.grad`` is restored to what it was before the call."""
    params = [p for _, p in trainable_params(model)]
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    out = []
    B = per_row_loss.shape[0]
    for r in range(B):
        for p in params:
            p.grad = None
        per_row_loss[r].backward(retain_graph=r < B - 1)
        out.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p))
                    .detach()
                    .float()
                    .reshape(-1)
                    for p in params
                ]
            )
        )
    for p, s in zip(params, saved):
        p.grad = s
    if not out:
        n = sum(p.numel() for p in params)
        return torch.zeros(0, n)
    return torch.stack(out)


def vmap_per_row_grads(
    model: nn.Module,
    row_loss: Callable[..., torch.Tensor],
    *inputs: torch.Tensor,
    randomness: str = "error",
) -> torch.Tensor:
    """Per-row gradients ``[B, n]`` (float32) with ``torch.func.vmap(torch.func.grad(...))``.

    ``row_loss(call, *row_inputs) -> scalar``: the loss of ONE row, where ``row_inputs`` are the
    ``inputs`` sliced at that row with a leading batch dim of 1 kept (``[1, ...]``) and
    ``call(*args, **kwargs)`` runs ``model`` functionally on them. ``randomness`` is passed to
    ``vmap`` (``"different"`` for models with active dropout).
    """
    names = [n for n, _ in trainable_params(model)]
    params = {n: p.detach() for n, p in trainable_params(model)}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))

    def one(ps: dict[str, torch.Tensor], *row: torch.Tensor) -> torch.Tensor:
        row = tuple(x.unsqueeze(0) for x in row)

        def call(*args: object, **kwargs: object) -> object:
            return torch.func.functional_call(model, {**frozen, **ps}, args, kwargs)

        return row_loss(call, *row)

    grads = torch.func.vmap(
        torch.func.grad(one), in_dims=(None, *([0] * len(inputs))), randomness=randomness
    )(params, *inputs)
    return torch.cat([grads[n].float().reshape(grads[n].shape[0], -1) for n in names], 1)


def gram_from_grads(
    grads: torch.Tensor, pairs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Norms ``[B]``, pair dots ``[P]`` and cosines ``[P]`` (float64) of per-row gradients
    ``grads [B, n]``."""
    g = grads.double()
    norms = g.norm(dim=1)
    if pairs is None:
        return norms, None, None
    pairs = torch.as_tensor(pairs).long()
    dots = (g[pairs[:, 0]] * g[pairs[:, 1]]).sum(1)
    den = norms[pairs[:, 0]] * norms[pairs[:, 1]]
    cos = torch.where(den > 0, dots / den.clamp_min(1e-300), torch.zeros_like(dots))
    return norms, dots, cos
