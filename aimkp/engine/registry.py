"""Rule registry: one rule per layer type, in the style of opacus' ``register_norm_sampler``.

A rule knows, for one module type, how the per-row gradient of each of the module's own trainable
parameters is formed from what the engine records per call of the module: the call's input
``a`` (flattened to ``[N, ...]`` tokens) and the gradient ``g`` of the loss with respect to the
call's output (``[N, d_out]``). The engine groups the tokens of all calls of a module by row
(``Tokens``), hands them to the rule once, after the backward, and the rule returns per-row squared
norms ``[B]`` and pair inner products ``[P]`` summed over the module's trainable parameters.

Adding a layer type::

    from aimkp.engine import register_rule, Rule

    @register_rule(MyLayer)
    class MyLayerRule(Rule):
        def gram(self, module, tok, pairs, backend, form): ...
        def reweight_grads(self, module, tok, token_scale): ...

Rules are looked up by the module's class (its MRO, so subclasses inherit a rule), then by the
predicates registered with ``register_rule(predicate=...)`` (used for RMSNorm-like classes that
share no base class), in registration order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Rule", "Tokens", "register_rule", "get_rule", "registered_rules"]


@dataclass
class Tokens:
    """The tokens of all calls of one module in one backward, sorted by row.

    Attributes:
        a: ``[N, *in_features]`` layer inputs (detached, original dtype); for nn.Embedding the ids
            ``[N]``.
        g: ``[N, d_out]`` gradients of the loss with respect to the layer outputs.
        rows: ``[N]`` int64 row index of each token, non-decreasing.
        offsets: ``[B + 1]`` int64: the tokens of row ``r`` are ``offsets[r]:offsets[r + 1]``.
        num_rows: ``B``.
        extra: rule-specific per-call data concatenated like ``a`` (may be None).
        known_max_len: the longest row's length when the caller already knows it (None: computed
            on first use of ``max_len``).
    """

    a: torch.Tensor
    g: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor
    num_rows: int
    extra: torch.Tensor | None = None
    known_max_len: int | None = None

    @property
    def max_len(self) -> int:
        """Length of the longest row (0 for no tokens)."""
        if self.known_max_len is None:
            lengths = self.offsets[1:] - self.offsets[:-1]
            self.known_max_len = int(lengths.max().item()) if lengths.numel() else 0
        return self.known_max_len

    def padded(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Scatter per-token ``x [N, D]`` to ``[B, max_len, D]`` (zeros after each row's end)."""
        B, T = self.num_rows, self.max_len
        n = x.shape[0]
        if n == B * T:  # every row has exactly T tokens: a view, no scatter
            return x.to(dtype).reshape(B, T, *x.shape[1:])
        out = x.new_zeros((B, T, *x.shape[1:]), dtype=dtype)
        pos = torch.arange(n, device=x.device) - self.offsets[self.rows]
        out[self.rows, pos] = x.to(dtype)
        return out


class Rule:
    """Base class of a per-layer rule. Subclasses implement ``gram`` and ``reweight_grads``.

    ``capture(module, args, output)`` returns what the forward hook keeps per call:
    ``(a, extra)``, with ``a`` of shape ``[*lead, ...]`` whose leading dims (``lead``, the same as
    the output's without its last dim) are the token dims. The default keeps the first positional
    input.
    """

    #: names of the module's own parameters the rule covers.
    param_names: tuple[str, ...] = ("weight", "bias")

    def out_feature_dims(self, module: nn.Module) -> int:
        """Number of trailing output dims that are features (the rest are token dims)."""
        return 1

    def bind(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        """The call's arguments as the positional tuple ``capture`` reads. The default: the
        positional arguments, or the first keyword argument when there are none."""
        return args if args else tuple(kwargs.values())[:1]

    def output_tensor(self, module: nn.Module, output: object) -> object:
        """The tensor whose gradient the rule needs, taken from the module's output (the output
        itself by default; a field of it for modules returning a structure)."""
        return output

    def capture(
        self, module: nn.Module, args: tuple, output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What to keep from one forward call: the layer input (detached) and rule extras."""
        return args[0].detach(), None

    def gram(
        self,
        module: nn.Module,
        tok: Tokens,
        pairs: torch.Tensor | None,
        backend: str,
        form: str,
    ) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """Per-row squared norms ``[B]`` and pair dots ``[P]`` (fp32) over the module's trainable
        parameters, and what ran: ``"torch"`` or ``"triton"``, optionally with the form, as in
        ``"triton/direct"`` or ``"torch/ghost"``."""
        raise NotImplementedError

    def reweight_grads(
        self, module: nn.Module, tok: Tokens, token_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``sum_t token_scale[t] * (gradient contribution of token t)`` per trainable parameter
        name of the module (fp32), used by ``GradGram.reweight``."""
        raise NotImplementedError

    #: parameters whose per-row gradient ``factors`` can give (needed when a parameter is tied,
    #: i.e. owned by several hooked modules; see ``aimkp.engine.tied``).
    factor_params: tuple[str, ...] = ()

    def factors(
        self, module: nn.Module, tok: Tokens, param_name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, v)`` with the per-row gradient of ``param_name`` equal to
        ``sum_{t in r} u_t v_t^T``: ``u [N, D0]`` (or ``[N]`` int64 ids, a one-hot over ``D0``)
        and ``v [N, D1]``, in ``tok``'s token order, ``v_t = 0`` for tokens without a gradient."""
        raise NotImplementedError(f"{type(self).__name__} gives no factors for {param_name!r}")

    def stash(self, module: nn.Module, tok: Tokens, storage: str) -> object:
        """What to keep after the backward for ``reweight`` (``storage``: ``"auto"``,
        ``"tokens"`` or ``"rows"``). The default keeps the tokens (inputs and output grads)."""
        return tok

    def reweight_stash(
        self, module: nn.Module, stash: object, row_delta: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``sum_r row_delta[r] G_r`` per trainable parameter name, from what ``stash`` kept."""
        tok = stash
        assert isinstance(tok, Tokens)
        ts = row_delta[tok.rows]
        if not bool((ts != 0).any()):
            return {}
        return self.reweight_grads(module, tok, ts)


_BY_TYPE: dict[type, Rule] = {}
_BY_PREDICATE: list[tuple[Callable[[nn.Module], bool], Rule]] = []


def register_rule(
    *module_types: type, predicate: Callable[[nn.Module], bool] | None = None
) -> Callable[[type], type]:
    """Class decorator registering a ``Rule`` subclass for module types and/or a predicate."""
    if not module_types and predicate is None:
        raise ValueError("register_rule needs at least one module type or a predicate")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise ValueError(f"register_rule decorates Rule subclasses, got {cls!r}")
        inst = cls()
        for t in module_types:
            _BY_TYPE[t] = inst
        if predicate is not None:
            _BY_PREDICATE.append((predicate, inst))
        return cls

    return deco


def get_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module`` (by class MRO first, then predicates), or None."""
    for klass in type(module).__mro__:
        if klass in _BY_TYPE:
            return _BY_TYPE[klass]
    for pred, rule in _BY_PREDICATE:
        if pred(module):
            return rule
    return None


def registered_rules() -> dict[str, str]:
    """Human-readable list of registered rules (type or predicate name -> rule class)."""
    out = {t.__name__: type(r).__name__ for t, r in _BY_TYPE.items()}
    for pred, r in _BY_PREDICATE:
        out[f"predicate:{getattr(pred, '__name__', repr(pred))}"] = type(r).__name__
    return out
