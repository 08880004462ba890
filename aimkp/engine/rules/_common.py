"""Small shared pieces of the rules: per-row vectors to norms / pair dots, segment sums."""

from __future__ import annotations

import torch

from aimkp.engine.registry import Tokens


def segment_sum(x: torch.Tensor, tok: Tokens) -> torch.Tensor:
    """Per-row sum of per-token ``x [N, D]`` -> ``[B, D]`` in fp32."""
    out = torch.zeros((tok.num_rows, *x.shape[1:]), dtype=torch.float32, device=x.device)
    if x.shape[0]:
        out.index_add_(0, tok.rows, x.to(torch.float32))
    return out


def vec_gram(
    s: torch.Tensor, pairs: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row gradient vectors ``s [B, D]`` -> squared norms ``[B]`` and pair dots ``[P]``."""
    s = s.flatten(1) if s.dim() > 1 else s[:, None]
    sq = s.square().sum(1)
    dots = None
    if pairs is not None:
        dots = (s[pairs[:, 0]] * s[pairs[:, 1]]).sum(1)
    return sq, dots


def add_into(
    acc: tuple[torch.Tensor, torch.Tensor | None],
    part: tuple[torch.Tensor, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Elementwise sum of two (norms^2, dots) results (dots may be None)."""
    sq = acc[0] + part[0]
    if acc[1] is None:
        return sq, part[1]
    if part[1] is None:
        return sq, acc[1]
    return sq, acc[1] + part[1]
