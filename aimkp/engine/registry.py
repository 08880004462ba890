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
        param_names = ("weight",)

        def per_token(self, module, tok, name):  # [N, D]: token t's gradient of `name`
            return tok.a * tok.g

A rule only says what one parameter's gradient is made of. ``per_token`` suffices when row r's
gradient of the parameter is the sum of per-token vectors (norm layers, biases): norms, pair dots
and the reweight then come from the base class. A parameter whose per-row gradient is a matrix
(``nn.Linear.weight``, an embedding table) overrides ``param_gram`` / ``param_reweight`` instead.
The base class sums over the module's trainable parameters (``Rule.gram``,
``Rule.reweight_grads``).

Rules are looked up by the module's class (its MRO, so subclasses inherit a rule), then by the
predicates registered with ``register_rule(predicate=...)`` (used for RMSNorm-like classes that
share no base class), in registration order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Gram",
    "GramRequest",
    "Rule",
    "Tokens",
    "get_rule",
    "register_rule",
    "registered_rules",
    "segment_sum",
    "vec_gram",
]


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
        known_max_len: the longest row's length when the caller already knows it (None: computed
            on first use of ``max_len``).
    """

    a: torch.Tensor
    g: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor
    num_rows: int
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

    def select(self, keep: torch.Tensor) -> Tokens:
        """The tokens where ``keep [N]`` is True (same rows, offsets recomputed)."""
        rows = self.rows[keep]
        counts = torch.bincount(rows, minlength=self.num_rows)
        offsets = torch.zeros_like(self.offsets)
        offsets[1:] = torch.cumsum(counts, 0)
        return Tokens(self.a[keep], self.g[keep], rows, offsets, self.num_rows)


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


@dataclass(frozen=True)
class GramRequest:
    """What the engine asks of a rule besides the module and its tokens.

    Attributes:
        pairs: ``[P, 2]`` int64 row pairs on the tokens' device, or None.
        backend: ``"torch"`` or ``"triton"``.
        form: ``"auto"``, ``"direct"`` or ``"ghost"`` (linear layers).
    """

    pairs: torch.Tensor | None
    backend: str
    form: str


#: ``(sq [B], dots [P] or None, what ran)`` of one parameter or of a whole module.
Gram = tuple[torch.Tensor, "torch.Tensor | None", str]


class Rule:
    """Base class of a per-layer rule: subclasses give ``per_token`` or ``param_gram`` /
    ``param_reweight`` per parameter name (see the module docstring).

    ``capture(module, args, output)`` returns what the forward hook keeps per call:
    ``a`` of shape ``[*lead, ...]`` whose leading dims (``lead``, the same as
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

    def capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """What to keep from one forward call: the layer input (detached)."""
        return args[0].detach()

    def trainable_names(self, module: nn.Module) -> list[str]:
        """The names in ``param_names`` whose parameter exists and requires grad."""
        out = []
        for n in self.param_names:
            p = getattr(module, n, None)
            if isinstance(p, torch.Tensor) and p.requires_grad:
                out.append(n)
        return out

    def per_token(self, module: nn.Module, tok: Tokens, name: str) -> torch.Tensor:
        """``[N, D]``: token t's contribution to the gradient of parameter ``name`` (row r's
        gradient is the sum over its tokens), for parameters without their own ``param_gram``."""
        raise NotImplementedError(f"{type(self).__name__} has no per-token gradient of {name!r}")

    def param_gram(self, module: nn.Module, tok: Tokens, name: str, req: GramRequest) -> Gram:
        """Per-row squared norms ``[B]`` and pair dots ``[P]`` (fp32) of one parameter's
        gradient, and what ran (``"torch"``, ``"triton/direct"``, ``"torch/ghost"``, ...)."""
        sq, dots = vec_gram(segment_sum(self.per_token(module, tok, name), tok), req.pairs)
        return sq, dots, "torch"

    def gram(
        self, module: nn.Module, tok: Tokens, pairs: torch.Tensor | None, backend: str, form: str
    ) -> Gram:
        """The sum of ``param_gram`` over the module's trainable parameters; what ran is the
        first parameter's that is not plain ``"torch"`` (else ``"torch"``)."""
        req = GramRequest(pairs, backend, form)
        dev = tok.g.device
        sq = torch.zeros(tok.num_rows, dtype=torch.float32, device=dev)
        dots = (
            None if pairs is None else torch.zeros(pairs.shape[0], dtype=torch.float32, device=dev)
        )
        ran = "torch"
        for name in self.trainable_names(module):
            s2, d2, r = self.param_gram(module, tok, name, req)
            sq += s2
            if dots is not None:
                assert d2 is not None  # pairs given: every parameter's Gram has its dots
                dots += d2
            ran = r if ran == "torch" else ran
        return sq, dots, ran

    def param_reweight(
        self, module: nn.Module, tok: Tokens, name: str, scale: torch.Tensor
    ) -> torch.Tensor:
        """``sum_t scale[t] * (token t's gradient of parameter name)`` (fp32); ``tok`` holds only
        tokens with a nonzero ``scale [N]``."""
        return (self.per_token(module, tok, name) * scale[:, None]).sum(0)

    def reweight_grads(
        self, module: nn.Module, tok: Tokens, token_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``sum_t token_scale[t] * (gradient contribution of token t)`` per trainable parameter
        name of the module (fp32), used by ``GradGram.reweight``. Tokens with a zero scale are
        masked out, never multiplied (a NaN there must not reach ``.grad``)."""
        sel = token_scale != 0
        sub, scale = tok.select(sel), token_scale[sel]
        return {n: self.param_reweight(module, sub, n, scale) for n in self.trainable_names(module)}

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
