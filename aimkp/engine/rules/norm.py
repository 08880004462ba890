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


class _NormRule(Rule):
    def out_feature_dims(self, module: nn.Module) -> int:
        shape = getattr(module, "normalized_shape", None)
        return len(shape) if shape is not None else 1

    def xhat(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """Normalised input ``[N, D]`` (fp32) of tokens ``a [N, ...]``."""
        raise NotImplementedError

    def per_token(self, module: nn.Module, tok: Tokens, name: str) -> torch.Tensor:
        """``weight``: ``xhat_t * g_t``; ``bias``: ``g_t`` (fp32)."""
        g = tok.g.to(torch.float32)
        if name == "weight":
            return self.xhat(module, tok.a).reshape(g.shape) * g
        return g


@register_rule(nn.LayerNorm)
class LayerNormRule(_NormRule):
    """``weight``: ``sum_t xhat_t * g_t``; ``bias``: ``sum_t g_t``."""

    def xhat(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        assert isinstance(module, nn.LayerNorm)  # the rule is registered for nn.LayerNorm only
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
