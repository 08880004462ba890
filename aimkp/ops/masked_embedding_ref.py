"""Plain-PyTorch reference of :func:`aimkp.ops.masked_embedding` (tests, benchmarks, fallback).

Obviously-correct composition of standard differentiable torch ops; autograd provides every
gradient. It checks nothing beyond what torch itself checks: the public function validates the
arguments before it calls this.

Worked example (V=5, D=2, one row, image_token_id=9, ignore_index=-100)::

    input_ids = [ 3,  9,  9,  1, -100]
    keep      = [ T,  T,  F,  F,    T]
    image_features rows f0, f1 (consumed by the two 9s in order, hidden or not)
    output    = [w3, f0, fill, fill, fill]      # hidden -> fill, ignored -> fill
    compact   : values [w3, f0, fill], positions [0, 1, 4], cu_seqlens [0, 3], index [0, 1, 4]
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class CompactEmbedding(NamedTuple):
    """Kept rows of a masked embedding, packed.

    - values: ``[K, D]`` embeddings of the kept positions, in flat (row-major) order.
    - positions: LongTensor ``[K]``, original index of each kept position within its row.
    - cu_seqlens: IntTensor ``[B+1]``, row offsets into ``values`` (``[0, K]`` for 1-D input).
    - index: LongTensor ``[K]``, flat index of each kept position into ``input_ids.reshape(-1)``.
    """

    values: Tensor
    positions: Tensor
    cu_seqlens: Tensor
    index: Tensor  # type: ignore[assignment]  # the field deliberately shadows tuple.index


def compaction_index(input_ids: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(index [K], positions [K], cu_seqlens [B+1])`` of the kept positions of ``input_ids``.

    ``input_ids`` is ``[N]`` or ``[B, T]``; ``keep`` (bool, same shape) or None (all kept).
    Data-dependent size K: one host synchronisation (``nonzero``).
    """
    rows = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    b, t = rows.shape
    dev = input_ids.device
    if keep is None:
        k2 = torch.ones(b, t, dtype=torch.bool, device=dev)
    else:
        k2 = keep.reshape(b, t)
    index = torch.nonzero(k2.reshape(-1)).reshape(-1)
    positions = index % t if t > 0 else index
    counts = k2.sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.zeros(b + 1, dtype=torch.int32, device=dev)
    cu_seqlens[1:] = torch.cumsum(counts, 0, dtype=torch.int32)
    return index, positions, cu_seqlens


def masked_embedding_reference(
    input_ids: Tensor,
    weight: Tensor,
    keep: Tensor | None = None,
    image_features: Tensor | None = None,
    image_token_id: int | None = None,
    fill: Tensor | None = None,
    ignore_index: int | None = None,
    compact: bool = False,
) -> Tensor | CompactEmbedding:
    """Reference masked embedding. Shapes: ids ``[N]``/``[B, T]``, weight ``[V, D]``.

    Returns ``[*input_ids.shape, D]`` or, with ``compact=True``, a :class:`CompactEmbedding`.
    """
    ids = input_ids.reshape(-1)
    n, d = ids.numel(), weight.shape[1]
    dev = ids.device
    is_img = (
        ids == image_token_id
        if image_token_id is not None
        else torch.zeros(n, dtype=torch.bool, device=dev)
    )
    is_ign = (
        ids == ignore_index if ignore_index is not None else torch.zeros_like(is_img)
    ) & ~is_img
    is_text = ~is_img & ~is_ign
    out = torch.nn.functional.embedding(torch.where(is_text, ids, 0), weight)
    if image_features is not None and image_features.shape[0] > 0:
        # k-th image position (flat order, hidden or not) takes image_features[k].
        rank = (torch.cumsum(is_img.long(), 0) - 1).clamp(min=0)
        rank = rank.clamp(max=image_features.shape[0] - 1)
        out = torch.where(is_img[:, None], image_features[rank], out)
    hidden = is_ign if keep is None else (is_ign | ~keep.reshape(-1))
    fill_row = fill if fill is not None else weight.new_zeros(d)
    out = torch.where(hidden[:, None], fill_row.expand(n, d), out)
    if not compact:
        return out.reshape(*input_ids.shape, d)
    index, positions, cu_seqlens = compaction_index(input_ids, keep)
    return CompactEmbedding(out[index], positions, cu_seqlens, index)
