"""Rule for :class:`aimkp.ops.MaskedEmbedding` (the fused modality-masked input embedding).

The table ``weight [V, D]`` gets gradient only from the output positions that read it: kept
positions whose id is an ordinary token. Image-token positions take rows of ``image_features``
(their gradient flows to the projector, which has its own rule), hidden positions take ``fill``
(or are dropped altogether with ``compact=True``), and ``padding_idx`` / ``ignore_index`` rows get
nothing. So the rule is the ``nn.Embedding`` rule on the ids of the positions that read the table,
with every other position marked ``-1`` (no gradient)::

    ids    = [ 7, IMG, IMG, 3, 9 ]     keep = [1, 1, 1, 0, 1]     (one row, not compact)
    a      = [ 7,  -1,  -1, -1, 9 ]    -> G_row[7] = g_0, G_row[9] = g_4

With ``compact=True`` the output is the packed ``values [K, D]`` of the kept positions (in the
order of ``CompactEmbedding.index``), so ``a`` is ``ids.reshape(-1)[index]`` marked the same way,
and the rows of those K tokens come from the batch's ``cu_seqlens`` or from ``module_rows``.

A learnable ``fill`` has no per-row rule here (a ValueError says so when it is trainable).
"""

from __future__ import annotations

import torch
from torch import nn

from aimkp.engine.registry import register_rule
from aimkp.engine.rules.embedding import EmbeddingRule
from aimkp.ops.masked_embedding import MaskedEmbedding

_ARG_NAMES = ("input_ids", "keep", "image_features", "compact")


@register_rule(MaskedEmbedding)
class MaskedEmbeddingRule(EmbeddingRule):
    """``weight``: the embedding rule over the positions that read the table (others ``-1``)."""

    param_names = ("weight",)

    def bind(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        unknown = sorted(set(kwargs) - set(_ARG_NAMES))
        if unknown:
            raise ValueError(f"MaskedEmbedding called with unknown arguments {unknown}")
        vals = list(args) + [None] * (len(_ARG_NAMES) - len(args))
        for i, name in enumerate(_ARG_NAMES):
            if name in kwargs:
                vals[i] = kwargs[name]
        return tuple(vals[: len(_ARG_NAMES)])

    def output_tensor(self, module: nn.Module, output: object) -> object:
        values = getattr(output, "values", None)
        return values if isinstance(values, torch.Tensor) else output

    def capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if module.fill is not None and module.fill.requires_grad:
            raise ValueError(
                "MaskedEmbedding with a trainable fill: the per-sample gradient engine has no "
                "rule for it (freeze fill, or leave learnable_fill off)"
            )
        input_ids, keep, image_features, compact = args
        ids = input_ids.detach().to(torch.int64)
        reads = torch.ones_like(ids, dtype=torch.bool)
        if keep is not None:
            reads &= keep.to(torch.bool)
        if image_features is not None and module.image_token_id is not None:
            reads &= ids != module.image_token_id
        if module.ignore_index is not None:
            reads &= ids != module.ignore_index
        a = torch.where(reads, ids, torch.full_like(ids, -1))
        if compact:
            from aimkp.ops.masked_embedding_ref import compaction_index

            index, _, _ = compaction_index(input_ids, keep)
            a = a.reshape(-1)[index.to(a.device)]
        if tuple(a.shape) != tuple(output.shape[:-1]):
            raise ValueError(
                f"MaskedEmbedding: ids of shape {list(a.shape)} do not match its output "
                f"{list(output.shape)}"
            )
        return a

    def _valid(self, module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        ok = ids >= 0
        if module.padding_idx is not None:
            ok &= ids != module.padding_idx
        return ok
