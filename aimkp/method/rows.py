"""The rows of a micro-step and their forward / backward, shared by the AimKP step, the SFT step,
the correction pass and the reference step.

A micro-step's rows are built once (:func:`plan_rows`): one row per PMM copy, their provisional
loss weights ``w0`` (every copy kept), keep masks and the collated batch. :func:`forward_losses`
runs them under the step's autocast; :func:`forward_backward` adds the backward of a weighted
sum of their losses.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from aimkp.method.gf import pairs_of, provisional_weights
from aimkp.method.options import StepOptions
from aimkp.method.pmm import Copy, StrideTable, build_keep
from aimkp.models import LoadedModel, RowBatch, RowLosses, collate_rows, forward_rows
from aimkp.models.adapter import EncodedSample
from aimkp.spans import span, tap

__all__ = [
    "StepRows",
    "autocast_ctx",
    "build_rows",
    "finite_only_backward",
    "forward_backward",
    "forward_losses",
    "nonfinite_samples",
    "plan_rows",
    "weighted_sum",
]

log = logging.getLogger(__name__)

#: ``objective(loss_sum [R]) -> scalar`` whose backward a micro-step runs.
Objective = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepRows:
    """The rows of one micro-step, built once and passed on (R rows, B samples, P pairs).

    Attributes:
        rows: the copies, in row order.
        pairs: LongTensor ``[P, 2]`` (original row, copy row) of every masked copy.
        w0: float64 ``[R]`` provisional loss weights (every copy kept).
        orig_rows: LongTensor ``[B]``: the row of each sample's original.
        keeps: BoolTensor ``[T_i]`` keep mask of each row.
        batch: the collated rows (with the engine's ``module_rows``).
    """

    rows: list[Copy]
    pairs: torch.Tensor
    w0: torch.Tensor
    orig_rows: torch.Tensor
    keeps: list[torch.Tensor]
    batch: RowBatch

    @property
    def n_input_tokens(self) -> int:
        """Tokens fed to the model: the kept tokens of every row."""
        return int(sum(int(k.sum()) for k in self.keeps))

    @property
    def has_pairs(self) -> bool:
        """True when some row is a masked copy (the filter has something to decide)."""
        return self.pairs.shape[0] > 0


def autocast_ctx(
    device: torch.device | str, amp_dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """Autocast to ``amp_dtype`` on CUDA (the frozen base's half dtype of ``--dtype``, or bf16
    with ``--bf16``); a no-op context elsewhere or without a dtype."""
    if amp_dtype is not None and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=amp_dtype)
    return contextlib.nullcontext()


def build_rows(
    samples: Sequence[EncodedSample], indices: Sequence[int], strides: StrideTable | None
) -> list[Copy]:
    """Rows of a micro-batch: originals only without a stride table, else every PMM copy."""
    if len(samples) != len(indices):
        raise ValueError(f"{len(samples)} samples but {len(indices)} dataset indices")
    rows: list[Copy] = []
    for b, (s, i) in enumerate(zip(samples, indices)):
        rows += [Copy(b, None, 1)] if strides is None else strides.copies(int(i), s, b)
    return rows


def plan_rows(
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    rows: Sequence[Copy],
    n_total: float,
    opts: StepOptions,
    *,
    layout: str = "auto",
) -> StepRows:
    """Build a micro-step's rows once: pairs, provisional weights, keep masks, collated batch.

    One row per copy. The model's row forward runs the frozen vision tower once per distinct
    sample and the trainable projector once per ROW, so the per-row gradient engine sees each
    copy's own projector activations (as if every copy had gone through the model alone).
    Compact rows are packed (varlen) with flash-attn and padded to the longest kept row with
    SDPA / eager (``layout="auto"``), whose packed form would need a dense ``[K, K]`` mask."""
    with span("plan_rows"):
        rows = list(rows)
        keeps = [build_keep(samples[c.sample], c.kind, c.stride) for c in rows]
        batch = collate_rows(
            loaded,
            list(samples),
            keeps,
            [c.sample for c in rows],
            mode=opts.mask_mode,
            device=opts.device,
            layout=layout,
        )
        return StepRows(
            rows=rows,
            pairs=pairs_of(rows),
            w0=provisional_weights(rows, n_total, opts.gf_reduce),
            orig_rows=torch.tensor(
                [r for r, c in enumerate(rows) if c.kind is None], dtype=torch.long
            ),
            keeps=keeps,
            batch=batch,
        )


def forward_losses(loaded: LoadedModel, batch: RowBatch, opts: StepOptions) -> RowLosses:
    """Row forward (under the step's autocast; through ``loaded.row_runner`` when it has one);
    ``loss_sum [R]`` in fp32, with autograd. The losses pass the ``row_losses`` tap
    (:mod:`aimkp.spans`) before anything reads them."""
    runner = loaded.row_runner  # --fsdp: the FSDP2 root module (aimkp.train.fsdp.RowRunner)
    with span("forward"), autocast_ctx(opts.device, opts.amp_dtype):
        out = forward_rows(loaded, batch) if runner is None else runner(batch)
    return tap("row_losses", replace(out, loss_sum=out.loss_sum.float()))


def forward_backward(
    loaded: LoadedModel, batch: RowBatch, objective: Objective, opts: StepOptions
) -> RowLosses:
    """Row forward and ``objective(loss_sum).backward()``; returns the :class:`RowLosses`."""
    with span("forward_backward"):
        out = forward_losses(loaded, batch, opts)
        objective(out.loss_sum).backward()
    return out


def finite_only_backward(
    loaded: LoadedModel, plan: StepRows, objective: Objective, opts: StepOptions
) -> tuple[RowLosses, torch.Tensor]:
    """Forward, then the backward only when every row's loss is finite.

    Returns ``(losses, bad [B])``: when some sample's loss is not finite (``bad.any()``) no
    backward ran (``.grad`` untouched) and the caller re-runs the step over the other samples.
    Checking between forward and backward costs nothing in the usual (finite) case; masking the
    objective instead would not be exact (0 times a non-finite activation gradient is NaN).

    Under ``--fsdp`` (``loaded.row_runner``) the ranks run their forwards and backwards in
    lockstep (each pass all-gathers the shards on every rank), so the backward runs anyway and
    nothing is left out (``bad`` all False): the non-finite rows are excluded from the filter
    (their losses are non-finite), and the non-finite gradient skips the optimizer step on every
    rank (:class:`aimkp.method.nonfinite.SkipGuard`)."""
    with span("forward_backward"):
        out = forward_losses(loaded, plan.batch, opts)
        bad = nonfinite_samples(plan, out.loss_sum)
        if bool(bad.any()) and loaded.row_runner is not None:
            log.warning("non-finite loss under --fsdp: this optimizer step will be skipped")
            bad = torch.zeros_like(bad)
        if not bool(bad.any()):
            objective(out.loss_sum).backward()
    return out, bad


def nonfinite_samples(plan: StepRows, loss_sum: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[B]`` (CPU): samples having a row whose ``loss_sum [R]`` is not finite."""
    finite = torch.isfinite(loss_sum.detach()).cpu()
    bad = torch.zeros(int(plan.orig_rows.numel()), dtype=torch.bool)
    for r, c in enumerate(plan.rows):
        bad[c.sample] |= not bool(finite[r])
    return bad


def weighted_sum(w: torch.Tensor) -> Objective:
    """Objective ``sum_r w_r loss_sum_r`` (``w`` cast to the losses' device and dtype)."""
    return lambda loss_sum: (loss_sum * w.to(loss_sum.device, loss_sum.dtype)).sum()
