"""The per-sample gradient engine: ``per_sample_grad_gram`` and its context object ``GradGram``.

One forward and exactly one backward of a batch of B rows give, besides the usual summed parameter
gradients, the per-row gradient norms ``||G_r||`` over all trainable parameters and the inner
products ``<G_i, G_j>`` for requested pairs, without ever materialising per-row gradients of the
whole model.

How: on entering, a forward hook is put on every module that owns trainable parameters (each
needs a rule from ``aimkp.engine.registry``; a module type without one is an error naming it).
Each forward call made with grad enabled keeps its input ``a`` and puts a tensor hook on its output
that receives ``g = dloss/doutput`` during the backward. Once every call of a module has its ``g``,
the module's tokens are grouped by row (batch index of padded ``[B, T, ...]`` activations, or the
segments of a packed ``[1, total_T, ...]`` batch given by ``cu_seqlens``) and the module's rule
adds its per-row squared norms and pair dots into the running totals; all calls of a module are
combined before squaring, so shared weights (a module called twice) are exact. A parameter owned by
several modules (tied weights: an LM head sharing the input embedding's table) gets, besides each
owner's own terms, the cross terms between the owners in ghost form (``aimkp.engine.tied``).

Rows of each call are found from its token shape ``lead`` (the output's shape without the feature
dims), in this order:
1. ``module_rows[name]`` (cu_seqlens over that module's flattened tokens), for modules whose tokens
   are neither padded nor packed rows (e.g. Qwen2-VL's vision merger sees all images' patches
   flattened);
2. packed: ``lead`` is ``[1, total_T]`` or ``[total_T]`` with ``total_T == cu_seqlens[-1]``;
3. padded: ``lead[0] == B`` (row = batch index; one image per row for a projector);
otherwise a ValueError names the module and its shapes.

Activation checkpointing: non-reentrant (``use_reentrant=False``, transformers' default) works:
forwards re-run inside the backward are ignored, the first forward's inputs are used (they are
kept alive, so the hooked layers' inputs are not freed by checkpointing). Reentrant checkpointing
runs the first forward without grad, so the hooked layers' parameters get gradients without a
recorded call: that is reported as an error, never silently wrong.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Importing the rules registers them.
from aimkp.engine import rules as _rules  # noqa: F401
from aimkp.engine.registry import Rule, Tokens, get_rule
from aimkp.engine.tied import factor_cross

__all__ = ["GradGram", "per_sample_grad_gram"]

log = logging.getLogger("aimkp.engine")

_BACKENDS = ("auto", "torch", "triton")
_FORMS = ("auto", "direct", "ghost")


@dataclass
class _Call:
    a: torch.Tensor
    extra: torch.Tensor | None
    lead: tuple[int, ...]
    g: torch.Tensor | None = None


@dataclass
class _ModState:
    name: str
    module: nn.Module
    rule: Rule
    calls: list[_Call] = field(default_factory=list)
    received: int = 0
    processed: bool = False
    touched: bool = False
    #: (index into GradGram._tied, parameter name) for each tied parameter the module owns
    tied: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _TiedGroup:
    """One trainable parameter owned by several hooked modules; ``factors`` collects, per owner
    processed in this backward, its tokens and ``Rule.factors`` until all owners are in."""

    label: str
    members: list[tuple[_ModState, str]]
    factors: dict[str, tuple[Tokens, tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict
    )


def _as_cu(x: Any, what: str) -> torch.Tensor:
    cu = torch.as_tensor(x).to(torch.int64).reshape(-1)
    if cu.numel() < 1 or int(cu[0]) != 0:
        raise ValueError(f"{what} must be a 1-D int tensor [B + 1] starting at 0, got {x!r}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{what} must be non-decreasing, got {cu.tolist()}")
    return cu.cpu()


class GradGram:
    """Per-row gradient norms and pair inner products from one backward; see the module docstring.

    Args:
        model: the module whose trainable parameters (``requires_grad``) are covered.
        pairs: ``[P, 2]`` int row pairs whose gradient inner products / cosines are wanted, or None.
        cu_seqlens: ``[B + 1]`` row offsets for a packed ``[1, total_T, ...]`` batch, or None.
        num_rows: B, when it is neither given by ``cu_seqlens`` nor inferable from the shapes.
        keep_for_reweight: keep per-layer inputs / output gradients so that ``reweight`` can
            rescale each row's contribution after the backward.
        backend: ``"auto"`` (Triton for CUDA tensors, batched torch matmuls on CPU), ``"torch"`` or
            ``"triton"`` (on CPU runs under ``TRITON_INTERPRET=1``).
        form: ``"auto"`` (cheaper of direct / ghost per layer), ``"direct"`` or ``"ghost"``.
        module_rows: ``{module name (or prefix): cu_seqlens}`` for modules whose tokens are not
            laid out as the batch's rows (see the module docstring).
        reweight_storage: what ``keep_for_reweight`` keeps per layer: ``"tokens"`` (layer inputs
            and output gradients), ``"rows"`` (per-row gradients, linear layers), or ``"auto"``
            (the smaller of the two per layer: per-row gradients for LoRA factors whose rows are
            longer than about r tokens).

    After the backward: ``norms [B]``, ``dots [P]``, ``cosines [P]`` (float32), ``backend`` (what
    ran: ``"torch"``, ``"triton"``, or ``"torch+triton"`` when some layers used each) and
    ``layers`` (per hooked module: backend and form, e.g. ``"triton/direct"``, ``"torch/ghost"``).
    """

    def __init__(
        self,
        model: nn.Module,
        pairs: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        num_rows: int | None = None,
        keep_for_reweight: bool = False,
        backend: str = "auto",
        form: str = "auto",
        module_rows: dict[str, torch.Tensor] | None = None,
        reweight_storage: str = "auto",
    ) -> None:
        if reweight_storage not in ("auto", "tokens", "rows"):
            raise ValueError(
                f"reweight_storage must be 'auto', 'tokens' or 'rows', got {reweight_storage!r}"
            )
        self.reweight_storage = reweight_storage
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.keep_for_reweight = bool(keep_for_reweight)
        self.requested_backend = backend
        self.form = form
        self._pairs_in = pairs
        self._cu: torch.Tensor | None = None
        self._num_rows: int | None = None
        self._module_rows: dict[str, torch.Tensor] = {}
        self.set_rows(cu_seqlens=cu_seqlens, num_rows=num_rows, module_rows=module_rows)
        self._states: list[_ModState] = []
        for name, mod in model.named_modules():
            own = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            rule = get_rule(mod)
            if rule is None:
                raise ValueError(
                    f"module '{name}' ({type(mod).__name__}) owns trainable parameter(s) {own} "
                    "but no per-sample gradient rule is registered for its type; register one "
                    "with aimkp.engine.register_rule or freeze these parameters"
                )
            missing = [n for n in own if n not in rule.param_names]
            if missing:
                raise ValueError(
                    f"module '{name}' ({type(mod).__name__}): rule {type(rule).__name__} covers "
                    f"{list(rule.param_names)} but parameter(s) {missing} are trainable"
                )
            self._states.append(_ModState(name or type(mod).__name__, mod, rule))
        self._tied = self._tied_groups()
        if not self._states:
            raise ValueError("model has no trainable parameters (nothing requires grad)")
        self._handles: list[Any] = []
        self._started = False
        self._B: int | None = None
        self._pairs: torch.Tensor | None = None
        self._sq: torch.Tensor | None = None
        self._dots: torch.Tensor | None = None
        self._ran: set[str] = set()
        #: per hooked module name: what computed its per-row numbers (e.g. "triton/direct")
        self.layers: dict[str, str] = {}
        self._stash: list[tuple[_ModState, object]] = []
        self._layout_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._reweighted = False
        self._finalized = False

    # ----------------------------------------------------------------------------- set-up
    def _tied_groups(self) -> list[_TiedGroup]:
        """Group the trainable parameters owned by several hooked modules (tied weights); each
        owner's rule must give the parameter's per-row ``factors``."""
        owners: dict[int, list[tuple[_ModState, str]]] = {}
        for st in self._states:
            for n, p in st.module.named_parameters(recurse=False):
                if p.requires_grad:
                    owners.setdefault(id(p), []).append((st, n))
        groups: list[_TiedGroup] = []
        for members in owners.values():
            if len(members) < 2:
                continue
            names = [f"{st.name}.{n}" for st, n in members]
            for st, n in members:
                if n not in st.rule.factor_params:
                    raise ValueError(
                        f"trainable parameter '{st.name}.{n}' is shared by {names} (tied "
                        f"weights) but rule {type(st.rule).__name__} cannot give its per-row "
                        "factors (Rule.factor_params); untie or freeze it"
                    )
            for st, n in members:
                st.tied.append((len(groups), n))
            groups.append(_TiedGroup(" = ".join(names), members))
        return groups

    def set_rows(
        self,
        cu_seqlens: torch.Tensor | None = None,
        num_rows: int | None = None,
        module_rows: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Set the row layout (before the backward): packed ``cu_seqlens [B + 1]``, ``num_rows``,
        and/or per-module ``module_rows``."""
        if getattr(self, "_started", False):
            raise ValueError("set_rows must be called before the backward")
        if cu_seqlens is not None:
            self._cu = _as_cu(cu_seqlens, "cu_seqlens")
        if num_rows is not None:
            if int(num_rows) < 0:
                raise ValueError(f"num_rows must be >= 0, got {num_rows}")
            self._num_rows = int(num_rows)
        if self._cu is not None and self._num_rows is not None:
            if self._cu.numel() - 1 != self._num_rows:
                raise ValueError(
                    f"cu_seqlens has {self._cu.numel() - 1} rows but num_rows={self._num_rows}"
                )
        for k, v in (module_rows or {}).items():
            self._module_rows[k] = _as_cu(v, f"module_rows[{k!r}]")

    def __enter__(self) -> GradGram:
        for st in self._states:
            h = st.module.register_forward_hook(self._make_fwd_hook(st), with_kwargs=True)
            self._handles.append(h)
            for p in st.module.parameters(recurse=False):
                if p.requires_grad:
                    self._handles.append(
                        p.register_post_accumulate_grad_hook(lambda _p, st=st: self._touch(st))
                    )
        return self

    @staticmethod
    def _touch(st: _ModState) -> None:
        st.touched = True

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc[0] is None and (self._started or any(st.touched for st in self._states)):
            self._finalize()
        for st in self._states:
            st.calls.clear()

    # ----------------------------------------------------------------------------- hooks
    def _make_fwd_hook(self, st: _ModState):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            output = st.rule.output_tensor(module, output)
            if not isinstance(output, torch.Tensor):
                raise ValueError(
                    f"module '{st.name}' ({type(module).__name__}) returned "
                    f"{type(output).__name__}, not a tensor: its rule cannot see the output "
                    "gradient"
                )
            if not output.requires_grad:
                return
            if torch._C._current_graph_task_id() != -1:
                # a forward re-run inside the backward: non-reentrant activation checkpointing
                # recomputing saved tensors. The first forward's call (same input, same RNG
                # state) already holds what the rule needs and its output gets the gradient.
                return
            if self._started:
                raise ValueError(
                    f"module '{st.name}' ran a forward after the backward started: run exactly one "
                    "forward + backward inside per_sample_grad_gram"
                )
            args = st.rule.bind(module, args, kwargs)
            a, extra = st.rule.capture(module, args, output)
            nf = st.rule.out_feature_dims(module)
            lead = tuple(output.shape[: output.dim() - nf])
            call = _Call(a, extra, lead)
            st.calls.append(call)
            output.register_hook(lambda g, st=st, call=call: self._on_grad(st, call, g))

        return hook

    def _on_grad(self, st: _ModState, call: _Call, g: torch.Tensor) -> None:
        if call.g is not None:
            raise RuntimeError(
                f"module '{st.name}': a second backward through the same forward inside "
                "per_sample_grad_gram (exactly one backward is supported)"
            )
        if not self._started:
            self._start()
        call.g = g.detach()
        st.received += 1
        if st.received == len(st.calls):
            self._process(st)

    # ----------------------------------------------------------------------------- rows
    def _start(self) -> None:
        self._started = True
        B = self._num_rows
        if B is None and self._cu is not None:
            B = self._cu.numel() - 1
        if B is None:
            leads3 = {c.lead[0] for st in self._states for c in st.calls if len(c.lead) >= 2}
            leads2 = {c.lead[0] for st in self._states for c in st.calls if len(c.lead) == 1}
            cands = leads3 or leads2
            if len(cands) != 1:
                raise ValueError(
                    "cannot infer the number of rows from the hooked layers' token shapes "
                    f"(leading dims seen: {sorted(leads3 | leads2)}); pass num_rows=B or cu_seqlens"
                )
            B = cands.pop()
        self._B = B
        dev = next(c.a.device for st in self._states for c in st.calls)
        self._device = dev
        P = 0
        if self._pairs_in is not None:
            pairs = torch.as_tensor(self._pairs_in).to(torch.int64)
            if pairs.numel() == 0:
                pairs = pairs.reshape(0, 2)
            if pairs.dim() != 2 or pairs.shape[1] != 2:
                raise ValueError(f"pairs must have shape [P, 2], got {tuple(pairs.shape)}")
            if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= B):
                raise ValueError(f"pairs index rows outside [0, {B}): {pairs.tolist()}")
            self._pairs = pairs.to(dev)
            P = pairs.shape[0]
        self._sq = torch.zeros(B, dtype=torch.float32, device=dev)
        self._dots = (
            torch.zeros(P, dtype=torch.float32, device=dev) if self._pairs is not None else None
        )

    def _row_ids(self, st: _ModState, lead: tuple[int, ...], device: torch.device) -> torch.Tensor:
        B = self._B
        n = math.prod(lead)
        cu = None
        for k, v in self._module_rows.items():
            if st.name == k or st.name.startswith(k + "."):
                cu = v
                if int(v[-1]) != n:
                    raise ValueError(
                        f"module_rows[{k!r}] covers {int(v[-1])} tokens but module '{st.name}' "
                        f"saw {n} (token shape {list(lead)})"
                    )
                if v.numel() - 1 != B:
                    raise ValueError(f"module_rows[{k!r}] has {v.numel() - 1} rows, expected {B}")
                break
        if cu is None and self._cu is not None and n == int(self._cu[-1]):
            if len(lead) == 1 or lead[0] == 1:
                cu = self._cu
        if cu is not None:
            counts = (cu[1:] - cu[:-1]).to(device)
            return torch.repeat_interleave(torch.arange(B, device=device), counts, output_size=n)
        if len(lead) >= 1 and lead[0] == B:
            return (
                torch.arange(B, device=device).repeat_interleave(n // B)
                if B
                else torch.zeros(0, dtype=torch.int64, device=device)
            )
        layout = f"packed total_T={int(self._cu[-1])}" if self._cu is not None else "padded"
        raise ValueError(
            f"module '{st.name}' ({type(st.module).__name__}) saw tokens of shape {list(lead)} "
            f"that map to no rows of the batch (B={B}, {layout}); pass "
            f"module_rows={{'{st.name}': cu_seqlens}} for it. (Tokens shared by several rows, "
            "e.g. one projector call per sample whose output several copies reuse, cannot be "
            "split by row: run such a module once per row.)"
        )

    def _layout(
        self, st: _ModState, lead: tuple[int, ...], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(rows [n], offsets [B + 1], max row length)`` of one call's tokens; cached per
        token shape (and ``module_rows`` entry), since most hooked layers share one layout."""
        mr = next(
            (k for k in self._module_rows if st.name == k or st.name.startswith(k + ".")), None
        )
        key = (mr, lead, str(device))
        hit = self._layout_cache.get(key)
        if hit is None:
            rows = self._row_ids(st, lead, device)
            counts = torch.bincount(rows, minlength=self._B)
            offsets = torch.zeros(self._B + 1, dtype=torch.int64, device=device)
            offsets[1:] = torch.cumsum(counts, 0)
            max_len = int(counts.max()) if self._B else 0
            hit = self._layout_cache[key] = (rows, offsets, max_len)
        return hit

    def _tokens(self, st: _ModState) -> Tokens | None:
        calls = [c for c in st.calls if c.g is not None]
        if not calls:
            return None
        a_l, g_l, r_l, e_l = [], [], [], []
        for c in calls:
            n = math.prod(c.lead)
            a_l.append(c.a.reshape(n, *c.a.shape[len(c.lead) :]))
            g_l.append(c.g.reshape(n, math.prod(c.g.shape[len(c.lead) :])))
            r_l.append(self._layout(st, c.lead, c.g.device))
            if c.extra is not None:
                e_l.append(c.extra.reshape(n, *c.extra.shape[len(c.lead) :]))
        if len(calls) == 1:  # rows of one call are sorted by construction
            rows, offsets, max_len = r_l[0]
            tok = Tokens(a_l[0], g_l[0], rows, offsets, self._B, e_l[0] if e_l else None)
            tok._max_len = max_len
            return tok
        a, g, rows = torch.cat(a_l), torch.cat(g_l), torch.cat([r[0] for r in r_l])
        extra = torch.cat(e_l) if e_l else None
        order = torch.argsort(rows, stable=True)
        a, g, rows = a[order], g[order], rows[order]
        extra = extra[order] if extra is not None else None
        counts = torch.bincount(rows, minlength=self._B)
        offsets = torch.zeros(self._B + 1, dtype=torch.int64, device=rows.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return Tokens(a=a, g=g, rows=rows, offsets=offsets, num_rows=self._B, extra=extra)

    def _process(self, st: _ModState) -> None:
        tok = self._tokens(st)
        st.calls.clear()
        st.received = 0
        if tok is None:
            return
        st.processed = True
        backend = self.requested_backend
        if backend == "auto":
            backend = "triton" if tok.g.is_cuda else "torch"
        with torch.no_grad():
            pairs = self._pairs
            if pairs is not None and pairs.device != tok.g.device:
                pairs = pairs.to(tok.g.device)
            sq, dots, ran = st.rule.gram(st.module, tok, pairs, backend, self.form)
        self._ran.add(ran.split("/")[0])
        self.layers[st.name] = ran
        self._sq += sq.to(self._sq.device)  # layers may sit on other devices (model parallel)
        if self._dots is not None:
            self._dots += dots.to(self._dots.device)
        if self.keep_for_reweight:
            with torch.no_grad():
                self._stash.append((st, st.rule.stash(st.module, tok, self.reweight_storage)))
        for gi, pname in st.tied:
            grp = self._tied[gi]
            with torch.no_grad():
                grp.factors[st.name] = (tok, st.rule.factors(st.module, tok, pname))
            if len(grp.factors) == len(grp.members):
                self._add_tied_cross(grp)

    def _add_tied_cross(self, grp: _TiedGroup) -> None:
        """Add the cross terms between the owners of a tied parameter (``aimkp.engine.tied``)."""
        B = self._B
        pairs = self._pairs
        dev = self._sq.device
        rows = torch.arange(B, device=dev)
        q = [torch.stack([rows, rows], 1)]
        if pairs is not None:
            q += [pairs.to(dev), pairs.to(dev).flip(1)]
        q_pairs = torch.cat(q)
        owners = list(grp.factors.values())
        with torch.no_grad():
            for m in range(len(owners)):
                for n in range(m + 1, len(owners)):
                    (tx, fx), (ty, fy) = owners[m], owners[n]
                    c = factor_cross(tx, fx, ty, fy, q_pairs.to(tx.g.device)).to(dev)
                    self._sq += 2 * c[:B]
                    if self._dots is not None:
                        P = pairs.shape[0]
                        self._dots += c[B : B + P] + c[B + P :]
        grp.factors.clear()
        self._ran.add("torch")
        self.layers[f"tied: {grp.label}"] = "torch/cross"

    def _finalize(self) -> None:
        if self._finalized:
            return
        if self._started:
            for st in self._states:
                if st.calls:
                    self._process(st)
        for grp in self._tied:  # an owner that saw no gradient adds no cross term
            grp.factors.clear()
        for st in self._states:
            if st.touched and not st.processed:
                raise ValueError(
                    f"parameters of module '{st.name}' ({type(st.module).__name__}) received a "
                    "gradient in this backward but no call of the module was seen (used "
                    "functionally, outside the module's forward, or run without grad and "
                    "recomputed by reentrant checkpointing?): per-row numbers would miss it"
                )
        if not self._started:
            raise ValueError(
                "no backward reached the hooked layers inside per_sample_grad_gram: run exactly "
                "one backward of the per-row loss inside the context before reading the results"
            )
        self._finalized = True
        log.debug("per_sample_grad_gram ran backend=%s", self.backend)

    # ----------------------------------------------------------------------------- results
    @property
    def num_rows(self) -> int:
        """B (known once the backward started)."""
        self._finalize()
        return int(self._B)

    @property
    def backend(self) -> str:
        """Which implementation computed the per-row quantities: ``"torch"``, ``"triton"``, or
        ``"torch+triton"``."""
        return "+".join(sorted(self._ran)) if self._ran else "none"

    @property
    def sq_norms(self) -> torch.Tensor:
        """``[B]`` float32 squared per-row gradient norms."""
        self._finalize()
        return self._sq.clamp_min(0)

    @property
    def norms(self) -> torch.Tensor:
        """``[B]`` float32 per-row gradient norms over all trainable parameters."""
        return self.sq_norms.sqrt()

    @property
    def dots(self) -> torch.Tensor:
        """``[P]`` float32 inner products of the pairs' per-row gradients."""
        self._finalize()
        if self._dots is None:
            raise ValueError("no pairs were given to per_sample_grad_gram")
        return self._dots

    @property
    def cosines(self) -> torch.Tensor:
        """``[P]`` float32 cosine similarities of the pairs' gradients (0 where a norm is 0)."""
        d = self.dots
        n = self.norms
        den = n[self._pairs[:, 0]] * n[self._pairs[:, 1]]
        return torch.where(den > 0, d / den.clamp_min(1e-30), torch.zeros_like(d))

    # ----------------------------------------------------------------------------- reweight
    def reweight(self, row_scale: torch.Tensor) -> None:
        """Change every trainable ``.grad`` from ``sum_r G_r`` (this backward's contribution) to
        ``sum_r row_scale[r] G_r``, exactly, without another backward.

        ``row_scale [B]``: only rows with a scale != 1 cost anything. Earlier ``.grad`` content
        (gradient accumulation) is left as it was. Can be called once per backward.
        """
        if not self.keep_for_reweight:
            raise ValueError("reweight needs per_sample_grad_gram(..., keep_for_reweight=True)")
        if self._reweighted:
            raise ValueError("reweight was already applied for this backward")
        self._finalize()
        scale = torch.as_tensor(row_scale, dtype=torch.float32).reshape(-1)
        if scale.numel() != self._B:
            raise ValueError(f"row_scale must have {self._B} entries, got {scale.numel()}")
        if not bool(torch.isfinite(scale).all()):
            raise ValueError("row_scale has non-finite entries")
        delta = (scale - 1.0).to(self._device)
        self._reweighted = True
        if bool((delta == 0).all()):
            self._stash.clear()
            return
        with torch.no_grad():
            for st, kept in self._stash:
                dev = next(st.module.parameters()).device
                for pname, d in st.rule.reweight_stash(st.module, kept, delta.to(dev)).items():
                    p = getattr(st.module, pname)
                    if p.grad is None:
                        p.grad = d.to(p.dtype).reshape(p.shape)
                    else:
                        p.grad.add_(d.reshape(p.shape).to(p.grad.dtype))
        self._stash.clear()

    def release(self) -> None:
        """Free what was kept for ``reweight``."""
        self._stash.clear()


def per_sample_grad_gram(
    model: nn.Module,
    pairs: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    num_rows: int | None = None,
    keep_for_reweight: bool = False,
    backend: str = "auto",
    form: str = "auto",
    module_rows: dict[str, torch.Tensor] | None = None,
    reweight_storage: str = "auto",
) -> GradGram:
    """Context manager giving per-row gradient norms / pair dots from exactly one backward.

    Example::

        with aimkp.per_sample_grad_gram(model, pairs=torch.tensor([[0, 1]])) as gram:
            loss = per_row_loss(model(x))   # [B]
            loss.sum().backward()
        gram.norms    # [B] float32
        gram.cosines  # [P] float32

    See ``GradGram`` for the arguments and ``aimkp.engine.gram`` for how rows are found.
    """
    return GradGram(
        model,
        pairs=pairs,
        cu_seqlens=cu_seqlens,
        num_rows=num_rows,
        keep_for_reweight=keep_for_reweight,
        backend=backend,
        form=form,
        module_rows=module_rows,
        reweight_storage=reweight_storage,
    )
