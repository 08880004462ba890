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

Rows of each call: ``aimkp.engine.rows`` (module_rows, packed cu_seqlens, padded batch index).
Hooks and activation checkpointing: ``aimkp.engine.hooks``. Accumulation per module:
``aimkp.engine.accumulate``. Reweight: ``aimkp.engine.reweight``.

Non-finite rows: a row whose gradient holds NaN / inf (e.g. its loss is NaN) has a NaN or inf
squared norm; its norm, the dots and cosines of every pair involving it are NaN (never a finite
number), ``finite_rows()`` is False for it, and ``reweight`` with a scale of 0 for it removes it
exactly (the other rows' gradient is left, finite). A finite row with a zero gradient has
cosine 0 with every row (the convention of a zero vector).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

# Importing the rules registers them.
from aimkp.engine import rules as _rules  # noqa: F401
from aimkp.engine.accumulate import Accumulator
from aimkp.engine.hooks import Call, HookSet, ModState, hooked_states
from aimkp.engine.reweight import ReweightStash
from aimkp.engine.rows import RowLayout
from aimkp.engine.tied import tied_groups

__all__ = ["GradGram", "per_sample_grad_gram"]

log = logging.getLogger("aimkp.engine")

_BACKENDS = ("auto", "torch", "triton")
_FORMS = ("auto", "direct", "ghost")


class GradGram:
    """Per-row gradient norms and pair inner products from one backward; see the module docstring.

    Args:
        model: the module whose trainable parameters (``requires_grad``) are covered.
        pairs: ``[P, 2]`` int row pairs whose gradient inner products / cosines are wanted, or None.
        cu_seqlens: ``[B + 1]`` row offsets for a packed ``[1, total_T, ...]`` batch, or None.
        num_rows: B, when it is neither given by ``cu_seqlens`` nor inferable from the shapes.
        keep_for_reweight: keep per-layer inputs / output gradients (and a copy of the existing
            ``.grad``) so that ``reweight`` can rescale each row's contribution after the backward.
        backend: ``"auto"`` (Triton for CUDA tensors, batched torch matmuls on CPU), ``"torch"`` or
            ``"triton"`` (on CPU runs under ``TRITON_INTERPRET=1``).
        form: ``"auto"`` (cheaper of direct / ghost per layer), ``"direct"`` or ``"ghost"``.
        module_rows: ``{module name (or prefix): cu_seqlens}`` for modules whose tokens are not
            laid out as the batch's rows (see ``aimkp.engine.rows``).
        reweight_storage: what ``keep_for_reweight`` keeps per layer: ``"tokens"`` (layer inputs
            and output gradients), ``"rows"`` (per-row gradients, linear layers), or ``"auto"``
            (the smaller of the two per layer: per-row gradients for LoRA factors whose rows are
            longer than about r tokens).
        keep_grad_before: with ``keep_for_reweight``, copy the trainable parameters' existing
            ``.grad`` on entering (one ``.grad`` of memory when accumulating micro-steps, nothing
            when ``.grad`` is None) so that ``reweight`` removes a non-finite row exactly; False
            skips the copy, and then such a removal needs ``.grad`` to be None on entering.

    After the backward: ``norms [B]``, ``dots [P]``, ``cosines [P]`` (float32), ``finite_rows()``,
    ``backend`` (what ran: ``"torch"``, ``"triton"``, or ``"torch+triton"`` when some layers used
    each) and ``layers`` (per hooked module: backend and form, e.g. ``"triton/direct"``).
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
        keep_grad_before: bool = True,
    ) -> None:
        stash = ReweightStash(reweight_storage, keep_grad_before)
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
        self.reweight_storage = reweight_storage
        self._rows = RowLayout()
        self._rows.update(cu_seqlens=cu_seqlens, num_rows=num_rows, module_rows=module_rows)
        self._states = hooked_states(model)
        self._stash: ReweightStash | None = stash if self.keep_for_reweight else None
        self._acc = Accumulator(
            self._rows,
            tied_groups(self._states),
            pairs,
            backend,
            form,
            self._stash.keep if self._stash is not None else None,
        )
        self._hooks = HookSet(self._states, self._on_grad, lambda: self._acc.started)
        self._finalized = False

    @property
    def layers(self) -> dict[str, str]:
        """Per hooked module name: what computed its per-row numbers (e.g. ``"triton/direct"``)."""
        return self._acc.layers

    def set_rows(self, **layout: Any) -> None:
        """Set the row layout (before the backward): ``cu_seqlens=`` (packed ``[B + 1]``),
        ``num_rows=`` and / or ``module_rows=`` (see ``RowLayout.update``)."""
        self._rows.update(**layout)

    # ----------------------------------------------------------------------------- context
    def __enter__(self) -> GradGram:
        if self._stash is not None:
            self._stash.snapshot(self._states)
        self._hooks.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.detach()
        if exc[0] is None and (self._acc.started or any(st.touched for st in self._states)):
            self._finalize()
        for st in self._states:
            st.calls.clear()

    def _on_grad(self, st: ModState, call: Call, g: torch.Tensor) -> None:
        self._acc.on_grad(self._states, st, call, g)

    def _finalize(self) -> None:
        if self._finalized:
            return
        self._acc.finish(self._states)
        self._finalized = True
        log.debug("per_sample_grad_gram ran backend=%s", self.backend)

    # ----------------------------------------------------------------------------- results
    @property
    def num_rows(self) -> int:
        """B (known once the backward started)."""
        self._finalize()
        assert self._rows.num_rows is not None  # fixed when the backward started
        return int(self._rows.num_rows)

    @property
    def backend(self) -> str:
        """Which implementation computed the per-row quantities: ``"torch"``, ``"triton"``, or
        ``"torch+triton"``."""
        return "+".join(sorted(self._acc.ran)) if self._acc.ran else "none"

    @property
    def sq_norms(self) -> torch.Tensor:
        """``[B]`` float32 squared per-row gradient norms (NaN / inf for a non-finite row)."""
        self._finalize()
        assert self._acc.sq is not None  # set when the backward started (finish checks)
        return self._acc.sq.clamp_min(0)

    @property
    def norms(self) -> torch.Tensor:
        """``[B]`` float32 per-row gradient norms over all trainable parameters."""
        return self.sq_norms.sqrt()

    def finite_rows(self) -> torch.Tensor:
        """``[B]`` bool: True for a row whose gradient norm is finite. A training step gives the
        other rows a scale of 0 in ``reweight`` (which then removes them exactly)."""
        return torch.isfinite(self.sq_norms)

    def _finite_pairs(self) -> torch.Tensor:
        ok = self.finite_rows()
        pairs = self._acc.pairs
        assert pairs is not None  # only asked for once dots checked that pairs were given
        return ok[pairs[:, 0]] & ok[pairs[:, 1]]

    @property
    def dots(self) -> torch.Tensor:
        """``[P]`` float32 inner products of the pairs' per-row gradients (NaN for a pair with a
        non-finite row)."""
        self._finalize()
        if self._acc.dots is None:
            raise ValueError("no pairs were given to per_sample_grad_gram")
        d = self._acc.dots
        return torch.where(self._finite_pairs(), d, torch.full_like(d, float("nan")))

    @property
    def cosines(self) -> torch.Tensor:
        """``[P]`` float32 cosine similarities of the pairs' gradients: NaN for a pair with a
        non-finite row, 0 for a pair of finite rows where a norm is 0."""
        d = self.dots
        n = self.norms
        pairs = self._acc.pairs
        assert pairs is not None  # self.dots raised if no pairs were given
        den = n[pairs[:, 0]] * n[pairs[:, 1]]
        cos = torch.where(den > 0, d / den.clamp_min(1e-30), torch.zeros_like(d))
        return torch.where(self._finite_pairs(), cos, torch.full_like(d, float("nan")))

    # ----------------------------------------------------------------------------- reweight
    def reweight(self, row_scale: torch.Tensor) -> None:
        """Change every trainable ``.grad`` from ``sum_r G_r`` (this backward's contribution) to
        ``sum_r row_scale[r] G_r``, exactly, without another backward.

        ``row_scale [B]``: when every row is finite only rows with a scale != 1 cost anything; a
        row with scale 0 is removed exactly even when it is non-finite (``aimkp.engine.reweight``).
        Earlier ``.grad`` content (gradient accumulation) is left as it was. Can be called once
        per backward.
        """
        if self._stash is None:
            raise ValueError("reweight needs per_sample_grad_gram(..., keep_for_reweight=True)")
        if self._stash.applied:
            raise ValueError("reweight was already applied for this backward")
        self._finalize()
        B = self._rows.num_rows
        scale = torch.as_tensor(row_scale, dtype=torch.float32).reshape(-1)
        if scale.numel() != B:
            raise ValueError(f"row_scale must have {B} entries, got {scale.numel()}")
        if not bool(torch.isfinite(scale).all()):
            raise ValueError("row_scale has non-finite entries")
        self._stash.apply(scale, self.finite_rows())

    def release(self) -> None:
        """Free what was kept for ``reweight``."""
        if self._stash is not None:
            self._stash.release()


def per_sample_grad_gram(model: nn.Module, *args: Any, **kwargs: Any) -> GradGram:
    """Context manager giving per-row gradient norms / pair dots from exactly one backward.

    Example::

        with aimkp.per_sample_grad_gram(model, pairs=torch.tensor([[0, 1]])) as gram:
            loss = per_row_loss(model(x))   # [B]
            loss.sum().backward()
        gram.norms    # [B] float32
        gram.cosines  # [P] float32

    The arguments are those of ``GradGram`` (pairs, cu_seqlens, num_rows, keep_for_reweight,
    backend, form, module_rows, reweight_storage, keep_grad_before); see ``aimkp.engine.rows``
    for how rows are found.
    """
    return GradGram(model, *args, **kwargs)


per_sample_grad_gram.__signature__ = inspect.signature(GradGram).replace(  # type: ignore[attr-defined]
    return_annotation=GradGram
)
