"""Reweight of the engine: change this backward's contribution to ``.grad`` from ``sum_r G_r`` to
``sum_r s_r G_r`` without another backward (book-keeping: each rule keeps, per layer, what
rebuilds its rows' gradients).

Two exact ways, from what each rule stashed after the backward (``Rule.stash``):

- all rows finite: ``.grad += sum_{r: s_r != 1} (s_r - 1) G_r`` (only rows whose scale differs
  from 1 cost anything);
- some row non-finite (its norm is NaN / inf, e.g. a NaN loss): ``(s_r - 1) G_r`` would carry the
  NaN into ``.grad`` even for ``s_r = 0`` (``0 * NaN = NaN``, ``grad - NaN = NaN``), so the
  stashed parameters' ``.grad`` is rebuilt as ``grad_before + sum_{r: s_r != 0} s_r G_r``, the
  zero-scale rows masked out (never multiplied). ``grad_before`` is what ``.grad`` held when the
  context was entered, so gradient accumulation across micro-steps stays exact.

Cost of the second way's ``grad_before``: a copy of the trainable parameters' existing ``.grad``
taken on entering (nothing when ``.grad`` is None, the first micro-step of an accumulation). With
``keep_grad_before=False`` no copy is taken; a non-finite row then can only be removed when
``.grad`` was None on entering (otherwise ``reweight`` raises a ValueError and changes nothing).
"""

from __future__ import annotations

import torch
from torch import nn

from aimkp.engine.hooks import ModState
from aimkp.engine.registry import Tokens

__all__ = ["ReweightStash"]

_STORAGES = ("auto", "tokens", "rows")


class ReweightStash:
    """What ``GradGram.reweight`` needs: per processed module the rule's stash, and the
    trainable parameters' ``.grad`` as it was on entering the context.

    Args:
        storage: ``"auto"``, ``"tokens"`` or ``"rows"`` (see ``GradGram``).
        keep_grad_before: copy the existing ``.grad`` on entering (see the module docstring).
    """

    def __init__(self, storage: str, keep_grad_before: bool = True) -> None:
        if storage not in _STORAGES:
            raise ValueError(
                f"reweight_storage must be 'auto', 'tokens' or 'rows', got {storage!r}"
            )
        self.storage = storage
        self.keep_grad_before = keep_grad_before
        #: names of parameters whose earlier .grad was not copied (keep_grad_before=False)
        self.not_copied: list[str] = []
        self.entries: list[tuple[ModState, object]] = []
        #: id(parameter) -> (parameter, its .grad on entering: a copy, or None)
        self.grad_before: dict[int, tuple[nn.Parameter, torch.Tensor | None]] = {}
        self.applied = False

    def snapshot(self, states: list[ModState]) -> None:
        """Copy the trainable parameters' ``.grad`` (on entering the context)."""
        for st in states:
            for n, p in st.trainable():
                if id(p) in self.grad_before:
                    continue
                before = None
                if p.grad is not None and self.keep_grad_before:
                    before = p.grad.detach().clone()
                elif p.grad is not None:
                    self.not_copied.append(f"{st.name}.{n}")
                self.grad_before[id(p)] = (p, before)

    def keep(self, st: ModState, tok: Tokens) -> None:
        """After ``st``'s rule ran: keep what its reweight needs."""
        self.entries.append((st, st.rule.stash(st.module, tok, self.storage)))

    def apply(self, scale: torch.Tensor, finite_rows: torch.Tensor) -> None:
        """Rescale row r's contribution by ``scale[r]`` (``[B]`` float32, finite)."""
        self.applied = True
        dev = finite_rows.device
        scale = scale.to(dev)
        with torch.no_grad():
            if bool(finite_rows.all()):
                delta = scale - 1.0
                if not bool((delta == 0).all()):
                    self._add_into_grads(self._sums(delta))
            elif not bool((scale == 1).all()):
                self._rebuild(scale)
        self.release()

    def _sums(self, row_weight: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(parameter, sum_{r: w_r != 0} w_r G_r)`` per stashed module and parameter."""
        out = []
        for st, kept in self.entries:
            dev = next(st.module.parameters()).device
            for pname, d in st.rule.reweight_stash(st.module, kept, row_weight.to(dev)).items():
                out.append((getattr(st.module, pname), d))
        return out

    def _rebuild(self, scale: torch.Tensor) -> None:
        """``.grad = grad_before + sum_{r: s_r != 0} s_r G_r`` for every stashed parameter."""
        if self.not_copied:
            names = ", ".join(self.not_copied[:3]) + (", ..." if len(self.not_copied) > 3 else "")
            raise ValueError(
                "reweight: a row's gradient is non-finite and .grad of "
                f"{names} held an earlier gradient that keep_grad_before=False did not copy: "
                "the row cannot be removed exactly (zero the grads before the context, or keep "
                "keep_grad_before=True)"
            )
        fresh: set[int] = set()
        for st, _ in self.entries:
            for _, p in st.trainable():
                if id(p) in fresh or p.grad is None:
                    continue
                fresh.add(id(p))
                before = self.grad_before.get(id(p), (p, None))[1]
                p.grad = before if before is not None else torch.zeros_like(p.grad)
        self._add_into_grads(self._sums(scale))

    @staticmethod
    def _add_into_grads(sums: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        for p, d in sums:
            if p.grad is None:
                p.grad = d.to(p.dtype).reshape(p.shape)
            else:
                p.grad.add_(d.reshape(p.shape).to(p.grad.dtype))

    def release(self) -> None:
        """Free the stash and the copies of ``.grad``."""
        self.entries.clear()
        self.grad_before.clear()
        self.not_copied.clear()
