"""Per-module accumulation of the engine: once every call of a module has its output gradient, its
tokens are grouped by row and its rule adds per-row squared norms ``[B]`` and pair dots ``[P]``
into the running totals (all calls of a module are combined before squaring, so a module called
twice is exact). Tied parameters get the owners' cross terms when the last owner is in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aimkp.engine.hooks import Call, ModState
from aimkp.engine.registry import Tokens
from aimkp.engine.rows import RowLayout, offsets_of
from aimkp.engine.tied import TiedGroup, cross_terms

__all__ = ["Accumulator", "tokens_of"]


def _flat(x: torch.Tensor, lead: tuple[int, ...], n: int, feature_dims_flat: bool) -> torch.Tensor:
    rest = x.shape[len(lead) :]
    return x.reshape(n, math.prod(rest)) if feature_dims_flat else x.reshape(n, *rest)


def tokens_of(st: ModState, layout: RowLayout) -> Tokens | None:
    """The tokens of all calls of ``st`` that got a gradient, sorted by row (None: no call)."""
    calls = [c for c in st.calls if c.g is not None]
    if not calls:
        return None
    B = layout.num_rows
    assert B is not None  # start() fixed B at the first gradient
    a_l, g_l, r_l = [], [], []
    for c in calls:
        n = math.prod(c.lead)
        assert c.g is not None  # kept above
        a_l.append(_flat(c.a, c.lead, n, False))
        g_l.append(_flat(c.g, c.lead, n, True))
        r_l.append(layout.of(st.name, type(st.module).__name__, c.lead, c.g.device))
    if len(calls) == 1:  # rows of one call are sorted by construction
        rows, offsets, max_len = r_l[0]
        return Tokens(a_l[0], g_l[0], rows, offsets, B, known_max_len=max_len)
    a, g, rows = torch.cat(a_l), torch.cat(g_l), torch.cat([r.rows for r in r_l])
    order = torch.argsort(rows, stable=True)
    a, g, rows = a[order], g[order], rows[order]
    offsets, _ = offsets_of(rows, B)
    return Tokens(a=a, g=g, rows=rows, offsets=offsets, num_rows=B)


@dataclass
class Accumulator:
    """Running per-row totals of one backward.

    Attributes given: ``layout`` (B is fixed at the first output gradient), ``tied`` (the tied
    parameter groups), ``pairs_in`` (``[P, 2]`` requested row pairs, checked once B is known, or
    None), ``backend`` (``"auto"``, ``"torch"``, ``"triton"``), ``form`` (``"auto"``,
    ``"direct"``, ``"ghost"``), ``on_tokens`` (called with ``(state, tokens)`` after each module's
    rule ran; the reweight stash keeps what it needs there).
    Attributes filled in: ``sq [B]``, ``dots [P]``, ``pairs``, ``device`` (at ``start``), ``ran``
    and ``layers`` (per hooked module name: what computed its numbers, e.g. ``"triton/direct"``).
    """

    layout: RowLayout
    tied: list[TiedGroup]
    pairs_in: torch.Tensor | None
    backend: str
    form: str
    on_tokens: Callable[[ModState, Tokens], None] | None
    started: bool = False
    device: torch.device | None = None
    pairs: torch.Tensor | None = None
    sq: torch.Tensor | None = None
    dots: torch.Tensor | None = None
    ran: set[str] = field(default_factory=set)
    layers: dict[str, str] = field(default_factory=dict)

    def start(self, states: list[ModState]) -> None:
        """At the first output gradient: fix B, the device, the pairs and zero totals."""
        self.started = True
        B = self.layout.start(c.lead for st in states for c in st.calls)
        dev = next(c.a.device for st in states for c in st.calls)
        self.device = dev
        if self.pairs_in is not None:
            pairs = torch.as_tensor(self.pairs_in).to(torch.int64)
            if pairs.numel() == 0:
                pairs = pairs.reshape(0, 2)
            if pairs.dim() != 2 or pairs.shape[1] != 2:
                raise ValueError(f"pairs must have shape [P, 2], got {tuple(pairs.shape)}")
            if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= B):
                raise ValueError(f"pairs index rows outside [0, {B}): {pairs.tolist()}")
            self.pairs = pairs.to(dev)
        self.sq = torch.zeros(B, dtype=torch.float32, device=dev)
        if self.pairs is not None:
            self.dots = torch.zeros(self.pairs.shape[0], dtype=torch.float32, device=dev)

    def on_grad(self, states: list[ModState], st: ModState, call: Call, g: torch.Tensor) -> None:
        """Tensor hook body: record ``g``; process the module once all its calls have one."""
        if call.g is not None:
            raise RuntimeError(
                f"module '{st.name}': a second backward through the same forward inside "
                "per_sample_grad_gram (exactly one backward is supported)"
            )
        if not self.started:
            self.start(states)
        call.g = g.detach()
        st.received += 1
        if st.received == len(st.calls):
            self.process(st)

    def process(self, st: ModState) -> None:
        """Run ``st``'s rule on its tokens and add the result to the totals."""
        tok = tokens_of(st, self.layout)
        st.calls.clear()
        st.received = 0
        if tok is None:
            return
        st.processed = True
        backend = self.backend
        if backend == "auto":
            backend = "triton" if tok.g.is_cuda else "torch"
        with torch.no_grad():
            pairs = self.pairs
            if pairs is not None and pairs.device != tok.g.device:
                pairs = pairs.to(tok.g.device)
            sq, dots, ran = st.rule.gram(st.module, tok, pairs, backend, self.form)
            self._add(sq, dots, ran, st.name)
            if self.on_tokens is not None:
                self.on_tokens(st, tok)
            for gi, pname in st.tied:
                grp = self.tied[gi]
                grp.factors[st.name] = (tok, st.rule.factors(st.module, tok, pname))
                if len(grp.factors) == len(grp.members):
                    # start() fixed B and made the totals before any module is processed
                    assert self.layout.num_rows is not None and self.sq is not None
                    sq, dots = cross_terms(grp, self.layout.num_rows, self.pairs, self.sq.device)
                    grp.factors.clear()
                    self._add(sq, dots, "torch/cross", f"tied: {grp.label}")

    def _add(self, sq: torch.Tensor, dots: torch.Tensor | None, ran: str, label: str) -> None:
        self.ran.add(ran.split("/")[0])
        self.layers[label] = ran
        assert self.sq is not None  # start() made the totals
        self.sq += sq.to(self.sq.device)  # layers may sit on other devices (model parallel)
        if self.dots is not None:
            assert dots is not None  # pairs were given: every Gram has its dots
            self.dots += dots.to(self.dots.device)

    def finish(self, states: list[ModState]) -> None:
        """After the backward: process modules still waiting, check every gradient was seen."""
        if self.started:
            for st in states:
                if st.calls:
                    self.process(st)
        for grp in self.tied:  # an owner that saw no gradient adds no cross term
            grp.factors.clear()
        for st in states:
            if st.touched and not st.processed:
                raise ValueError(
                    f"parameters of module '{st.name}' ({type(st.module).__name__}) received a "
                    "gradient in this backward but no call of the module was seen (used "
                    "functionally, outside the module's forward, or run without grad and "
                    "recomputed by reentrant checkpointing?): per-row numbers would miss it"
                )
        if not self.started:
            raise ValueError(
                "no backward reached the hooked layers inside per_sample_grad_gram: run exactly "
                "one backward of the per-row loss inside the context before reading the results"
            )
