"""Rule for ``nn.Linear`` (and so for peft LoRA's ``lora_A`` / ``lora_B``, the linear layers of a
multimodal projector, and any subclass).

For ``y = a W^T + b`` seen by row r at its tokens t (inputs ``a_t [d_in]``, output gradients
``g_t [d_out]``) the row's gradients are ``G_r = sum_t g_t a_t^T`` (``[d_out, d_in]``) and
``b_r = sum_t g_t``.

Tiny example (d_in = 2, d_out = 1, B = 2 rows, row 0 has tokens t0, t1, row 1 has t2)::

    a = [[1, 0],      g = [[ 2],      rows = [0, 0, 1]
         [0, 1],           [ 3],
         [1, 1]]           [-1]]

    direct form: G_0 = g_0 a_0^T + g_1 a_1^T = [[2, 0]] + [[0, 3]] = [[2, 3]]  -> ||G_0||^2 = 13
                 G_1 = [[-1, -1]]                                               -> ||G_1||^2 = 2
    ghost form:  row 0: A = a a^T over its tokens = [[1, 0], [0, 1]]
                        K = g g^T               = [[4, 6], [6, 9]]
                        ||G_0||^2 = sum(A * K) = 4 + 9 = 13 (same number, no G formed)
    pair (0, 1): <G_0, G_1> = sum_{t in 0, s in 1} (a_t . a_s)(g_t . g_s)
                            = (1)(2 * -1) + (1)(3 * -1) = -5 = [[2, 3]] . [[-1, -1]]
    bias:        b_0 = 2 + 3 = 5, b_1 = -1 -> ||b_0||^2 = 25, <b_0, b_1> = -5

The direct form costs ``~T d_in d_out`` per row, the ghost form ``~T^2 (d_in + d_out)``; the rule
picks the cheaper one per layer (for LoRA factors with small ``r`` the direct form wins). On CUDA
both forms run the Triton kernels of ``aimkp.kernels.grad_gram`` (direct: one program per row or
pair and tile of ``G``; ghost: one program per row or pair and block of token pairs; fp32
accumulation, neither per-row gradients nor ``[T, T]`` Gram matrices written to memory); on CPU
both forms are batched matmuls in fp32, tiled to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aimkp.engine.registry import Gram, GramRequest, Rule, Tokens, register_rule, segment_sum

# Bound on the fp32 elements of one batched tile of per-row gradients (CPU direct form).
_TILE_ELEMS = 1 << 24
# Up to this many rows, pair dots come from one [B, B] Gram matmul of the flattened tiles.
_GRAM_ROWS = 64


def choose_form(tok: Tokens, d_in: int, d_out: int, n_pairs: int) -> str:
    """``"direct"`` or ``"ghost"``: the one with fewer multiply-adds for this layer and batch."""
    B, T = tok.num_rows, tok.max_len
    direct = (B * T + n_pairs) * d_in * d_out
    ghost = (B + n_pairs) * T * T * (d_in + d_out)
    return "direct" if direct <= ghost else "ghost"


def linear_weight_gram_torch(
    a_pad: torch.Tensor, g_pad: torch.Tensor, pairs: torch.Tensor | None, form: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Norms^2 ``[B]`` and pair dots ``[P]`` of ``G_r = g_pad[r]^T a_pad[r]`` with batched fp32
    matmuls. ``a_pad [B, T, d_in]``, ``g_pad [B, T, d_out]`` (zero rows beyond each row's end)."""
    B, T, d_in = a_pad.shape
    d_out = g_pad.shape[2]
    P = 0 if pairs is None else pairs.shape[0]
    sq = torch.zeros(B, dtype=torch.float32, device=a_pad.device)
    dots = None if pairs is None else torch.zeros(P, dtype=torch.float32, device=a_pad.device)
    if form == "direct":
        chunk = max(1, min(d_out, _TILE_ELEMS // max(1, B * d_in)))
        for o0 in range(0, d_out, chunk):
            G = torch.bmm(g_pad[:, :, o0 : o0 + chunk].transpose(1, 2), a_pad)  # [B, c, d_in]
            Gf = G.flatten(1)
            if P and B <= _GRAM_ROWS:  # one [B, B] Gram matmul gives norms and every pair
                assert pairs is not None and dots is not None  # P > 0: pairs were given
                K = Gf @ Gf.t()
                sq += K.diagonal()
                dots += K[pairs[:, 0], pairs[:, 1]]
                continue
            sq += torch.linalg.vector_norm(Gf, dim=1).square()
            if P:
                assert pairs is not None and dots is not None  # P > 0: pairs were given
                dots += (Gf[pairs[:, 0]] * Gf[pairs[:, 1]]).sum(1)
        return sq, dots
    if form != "ghost":
        raise ValueError(f"form must be 'direct' or 'ghost', got {form!r}")
    rows_per = max(1, _TILE_ELEMS // max(1, T * T))
    for r0 in range(0, B, rows_per):
        a, g = a_pad[r0 : r0 + rows_per], g_pad[r0 : r0 + rows_per]
        sq[r0 : r0 + rows_per] = (
            torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))
        ).sum((1, 2))
    for p0 in range(0, P, rows_per):
        assert pairs is not None and dots is not None  # P > 0: pairs were given
        pi, pj = pairs[p0 : p0 + rows_per, 0], pairs[p0 : p0 + rows_per, 1]
        ka = torch.bmm(a_pad[pi], a_pad[pj].transpose(1, 2))
        kg = torch.bmm(g_pad[pi], g_pad[pj].transpose(1, 2))
        dots[p0 : p0 + rows_per] = (ka * kg).sum((1, 2))
    return sq, dots


@dataclass
class _RowGrads:
    """Per-row gradients kept for reweight: ``weight [B, d_out, d_in]``, ``bias [B, d_out]``."""

    weight: torch.Tensor
    bias: torch.Tensor | None


@register_rule(nn.Linear)
class LinearRule(Rule):
    """``weight`` (direct or ghost form, see the module docstring) and ``bias`` (``sum_t g_t``)."""

    def per_token(self, module: nn.Module, tok: Tokens, name: str) -> torch.Tensor:
        """The bias: ``g_t``."""
        return tok.g.to(torch.float32)

    def param_gram(self, module: nn.Module, tok: Tokens, name: str, req: GramRequest) -> Gram:
        if name != "weight":
            return super().param_gram(module, tok, name, req)
        weight = module.weight
        assert isinstance(weight, torch.Tensor)  # a Parameter, not a submodule
        d_out, d_in = weight.shape
        pairs = req.pairs
        f = req.form
        if f == "auto":
            f = choose_form(tok, d_in, d_out, len(pairs) if pairs is not None else 0)
        if req.backend == "triton":
            from aimkp.kernels.grad_gram import grad_gram_direct, grad_gram_ghost

            kernel = grad_gram_direct if f == "direct" else grad_gram_ghost
            return (*kernel(tok.a, tok.g, tok.offsets, pairs), f"triton/{f}")
        sq, dots = linear_weight_gram_torch(tok.padded(tok.a), tok.padded(tok.g), pairs, f)
        return sq, dots, f"torch/{f}"

    def param_reweight(
        self, module: nn.Module, tok: Tokens, name: str, scale: torch.Tensor
    ) -> torch.Tensor:
        if name != "weight":
            return super().param_reweight(module, tok, name, scale)
        return (tok.g.to(torch.float32) * scale[:, None]).t() @ tok.a.to(torch.float32)

    factor_params = ("weight",)

    def factors(
        self, module: nn.Module, tok: Tokens, param_name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``G_r = sum_t g_t a_t^T``: ``u = g``, ``v = a``."""
        if param_name != "weight":
            return super().factors(module, tok, param_name)
        return tok.g, tok.a.flatten(1)

    def stash(self, module: nn.Module, tok: Tokens, storage: str) -> object:
        """Keep the tokens (``N (d_in + d_out)`` elements) or, when smaller (LoRA factors with
        rows longer than about r tokens), the per-row gradients ``[B, d_out, d_in]`` in fp32."""
        w = module.weight
        if storage == "tokens" or w is None or not w.requires_grad:
            return tok
        assert isinstance(w, torch.Tensor)  # a Parameter, not a submodule
        d_out, d_in = w.shape
        n = tok.g.shape[0]
        per_row = tok.num_rows * d_out * d_in * 4
        per_tok = n * (d_in * tok.a.element_size() + d_out * tok.g.element_size())
        if storage == "auto" and per_row >= per_tok:
            return tok
        g_pad = tok.padded(tok.g)
        G = torch.bmm(g_pad.transpose(1, 2), tok.padded(tok.a))  # [B, d_out, d_in]
        b = module.bias
        S = segment_sum(tok.g, tok) if b is not None and b.requires_grad else None
        return _RowGrads(G, S)

    def reweight_stash(
        self, module: nn.Module, stash: object, row_delta: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if not isinstance(stash, _RowGrads):
            return super().reweight_stash(module, stash, row_delta)
        sel = row_delta != 0
        if not bool(sel.any()):
            return {}
        d = row_delta[sel]
        out = {"weight": torch.einsum("b,boi->oi", d, stash.weight[sel])}
        if stash.bias is not None:
            out["bias"] = d @ stash.bias[sel]
        return out
