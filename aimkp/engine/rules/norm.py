"""Rules for normalisation layers: ``nn.LayerNorm``, ``nn.RMSNorm`` and RMSNorm-like classes
(transformers' ``LlamaRMSNorm``, ``Qwen2RMSNorm``, ...: any class whose name ends in ``RMSNorm``
with a ``weight`` and a ``variance_epsilon`` or ``eps``).

With ``xhat_t`` the normalised input of token t (LayerNorm: ``(a - mean) / sqrt(var + eps)``,
RMSNorm: ``a / sqrt(mean(a^2) + eps)``) the row gradients are ``w_r = sum_t xhat_t * g_t`` and
``b_r = sum_t g_t`` (vectors of the normalised size), so norms and pair dots are those of two
``[B, D]`` matrices of per-row sums.

Tiny example (RMSNorm, D = 2, eps = 0, one row with two tokens)::

    a = [[3, 4], [1, -1]]   mean(a^2) = [12.5, 1]   xhat = [[0.8485, 1.1314], [1, -1]]
    g = [[1, 0], [2, 2]]
    w_0 = xhat_0 * g_0 + xhat_1 * g_1 = [0.8485, 0] + [2, -2] = [2.8485, -2]
    ||w_0||^2 = 8.114 + 4 = 12.114
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aimkp.engine.registry import Rule, Tokens, register_rule
from aimkp.engine.rules._common import segment_sum, vec_gram


class _NormRule(Rule):
    def out_feature_dims(self, module: nn.Module) -> int:
        shape = getattr(module, "normalized_shape", None)
        return len(shape) if shape is not None else 1

    def xhat(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """Normalised input ``[N, D]`` (fp32) of tokens ``a [N, ...]``."""
        raise NotImplementedError

    def _per_token(self, module: nn.Module, tok: Tokens) -> dict[str, torch.Tensor]:
        g = tok.g.to(torch.float32)
        out = {}
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.requires_grad:
            out["weight"] = self.xhat(module, tok.a).reshape(g.shape) * g
        b = getattr(module, "bias", None)
        if isinstance(b, torch.Tensor) and b.requires_grad:
            out["bias"] = g
        return out

    def gram(
        self,
        module: nn.Module,
        tok: Tokens,
        pairs: torch.Tensor | None,
        backend: str,
        form: str,
    ) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        sq = torch.zeros(tok.num_rows, dtype=torch.float32, device=tok.g.device)
        dots = None
        if pairs is not None:
            dots = torch.zeros(pairs.shape[0], dtype=torch.float32, device=tok.g.device)
        for per_tok in self._per_token(module, tok).values():
            s2, d2 = vec_gram(segment_sum(per_tok, tok), pairs)
            sq += s2
            if dots is not None:
                dots += d2
        return sq, dots, "torch"

    def reweight_grads(
        self, module: nn.Module, tok: Tokens, token_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        sel = token_scale != 0
        sub = Tokens(tok.a[sel], tok.g[sel], tok.rows[sel], tok.offsets, tok.num_rows)
        return {
            n: (v * token_scale[sel, None]).sum(0) for n, v in self._per_token(module, sub).items()
        }


@register_rule(nn.LayerNorm)
class LayerNormRule(_NormRule):
    """``weight``: ``sum_t xhat_t * g_t``; ``bias``: ``sum_t g_t``."""

    def xhat(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(a.to(torch.float32), module.normalized_shape, eps=module.eps)


def _rmsnorm_like(module: nn.Module) -> bool:
    return (
        type(module).__name__.lower().endswith("rmsnorm")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))
    )


@register_rule(nn.RMSNorm, predicate=_rmsnorm_like)
class RMSNormRule(_NormRule):
    """``weight``: ``sum_t xhat_t * g_t`` with ``xhat = a / sqrt(mean(a^2) + eps)`` computed in
    fp32 and, like transformers' ``LlamaRMSNorm``, rounded to the input dtype before the scale.
    (Also right for Gemma-style ``(1 + weight)`` scales: the derivative is the same.)"""

    def xhat(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        eps = getattr(module, "variance_epsilon", None)
        if eps is None:
            eps = getattr(module, "eps", None)
        if eps is None:
            eps = torch.finfo(a.dtype).eps
        x = a.to(torch.float32)
        dims = tuple(range(-self.out_feature_dims(module), 0))
        x = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
        return x.to(a.dtype).to(torch.float32)
