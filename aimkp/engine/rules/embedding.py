"""Rule for a trainable ``nn.Embedding`` (``weight [V, D]``).

Row r's gradient is ``G_r[v] = sum_{t in r, id_t = v} g_t`` (ids equal to ``padding_idx`` get no
gradient). Tokens are grouped by ``(row, id)`` with one sort, so no ``T x T`` matrix is formed:
``||G_r||^2 = sum_v ||G_r[v]||^2`` and ``<G_i, G_j> = sum_v <G_i[v], G_j[v]>`` over the ids the two
rows share.

Tiny example (V = 5, D = 2, B = 2; row 0 has ids [3, 1, 3], row 1 has ids [1])::

    g = [[1, 0], [0, 2], [1, 1], [4, 0]]      rows = [0, 0, 0, 1]
    keys = row * V + id = [3, 1, 3, 6]  -> unique [1, 3, 6]
    S (per (row, id) sums): key 1 (row 0, id 1): [0, 2]
                            key 3 (row 0, id 3): [1, 0] + [1, 1] = [2, 1]
                            key 6 (row 1, id 1): [4, 0]
    ||G_0||^2 = |[0, 2]|^2 + |[2, 1]|^2 = 4 + 5 = 9;   ||G_1||^2 = 16
    pair (0, 1): shared id 1 only: <[0, 2], [4, 0]> = 0
"""

from __future__ import annotations

import torch
from torch import nn

from aimkp.engine.registry import Gram, GramRequest, Rule, Tokens, register_rule


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated ``arange(starts[k], starts[k] + counts[k])`` and the k of each element."""
    total = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    base = torch.cumsum(counts, 0) - counts
    idx = starts[owner] + torch.arange(total, device=counts.device) - base[owner]
    return idx, owner


def _num_ids(module: nn.Module) -> int:
    """V, the rows of the module's ``weight [V, D]`` (an nn.Embedding or a MaskedEmbedding)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)  # a Parameter, not a submodule
    return weight.shape[0]


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """``weight``: per-(row, id) sums of output gradients, then norms / shared-id dots."""

    param_names = ("weight",)

    def capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if module.scale_grad_by_freq or module.sparse or module.max_norm is not None:
            raise ValueError(
                f"{type(module).__name__}: scale_grad_by_freq / sparse / max_norm embeddings "
                "have no per-sample gradient rule"
            )
        return args[0].detach()

    def _valid(self, module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Tokens whose gradient reaches ``weight`` (all but ``padding_idx``)."""
        pad = module.padding_idx
        if pad is None:
            return torch.ones_like(ids, dtype=torch.bool)
        assert isinstance(pad, int)  # nn.Embedding's and MaskedEmbedding's padding_idx
        return ids != (pad % _num_ids(module))

    def _groups(self, module: nn.Module, tok: Tokens):  # noqa: ANN202
        V = _num_ids(module)
        ids = tok.a.reshape(-1).to(torch.int64)
        keep = self._valid(module, ids)
        keys = tok.rows[keep] * V + ids[keep]
        uk, inv = torch.unique(keys, return_inverse=True)
        S = torch.zeros(uk.numel(), tok.g.shape[1], dtype=torch.float32, device=tok.g.device)
        S.index_add_(0, inv, tok.g[keep].to(torch.float32))
        return uk, S, V

    def param_gram(self, module: nn.Module, tok: Tokens, name: str, req: GramRequest) -> Gram:
        B, pairs = tok.num_rows, req.pairs
        uk, S, V = self._groups(module, tok)
        row_u = uk // V
        sq = torch.zeros(B, dtype=torch.float32, device=S.device)
        sq.index_add_(0, row_u, S.square().sum(1))
        if pairs is None:
            return sq, None, "torch"
        P = pairs.shape[0]
        dots = torch.zeros(P, dtype=torch.float32, device=S.device)
        counts = torch.bincount(row_u, minlength=B)
        uoff = torch.cumsum(counts, 0) - counts  # first unique key of each row (keys sorted)
        li, lp = _ranges(uoff[pairs[:, 0]], counts[pairs[:, 0]])
        ri, rp = _ranges(uoff[pairs[:, 1]], counts[pairs[:, 1]])
        if li.numel() == 0 or ri.numel() == 0:
            return sq, dots, "torch"
        lkey = lp * V + uk[li] % V  # sorted: by pair, then id
        rkey = rp * V + uk[ri] % V
        pos = torch.searchsorted(lkey, rkey).clamp_max(lkey.numel() - 1)
        hit = lkey[pos] == rkey
        dots.index_add_(0, rp[hit], (S[li[pos[hit]]] * S[ri[hit]]).sum(1))
        return sq, dots, "torch"

    factor_params = ("weight",)

    def factors(
        self, module: nn.Module, tok: Tokens, param_name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``G_r = sum_t e_{id_t} g_t^T``: ``u`` = the ids (0 where no gradient), ``v = g``
        (0 where no gradient: ``padding_idx``, positions that do not read the table)."""
        if param_name != "weight":
            return super().factors(module, tok, param_name)
        ids = tok.a.reshape(-1).to(torch.int64)
        keep = self._valid(module, ids)
        return torch.where(keep, ids, torch.zeros_like(ids)), tok.g * keep[:, None].to(tok.g.dtype)

    def param_reweight(
        self, module: nn.Module, tok: Tokens, name: str, scale: torch.Tensor
    ) -> torch.Tensor:
        ids = tok.a.reshape(-1).to(torch.int64)
        sel = self._valid(module, ids)
        out = torch.zeros(_num_ids(module), tok.g.shape[1], dtype=torch.float32,
                          device=tok.g.device)  # fmt: skip
        out.index_add_(0, ids[sel], tok.g[sel].to(torch.float32) * scale[sel, None])
        return out
