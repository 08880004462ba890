"""One training epoch: a seeded sample order, optimizer steps over accumulated micro-steps.

Per epoch a permutation seeded with ``seed + epoch`` (so resuming reproduces the order); per
optimizer step the same global batch on every rank, ``grad_accum`` micro-batches of
``batch_size`` samples of this rank's share, every loss weight divided by the answer tokens of
the whole global batch (:func:`accumulate`); then gradient all-reduce, clipping, AdamW and the
schedule (:func:`optimizer_step`). Hooks for later work sit between these two calls in
:func:`run_epoch` (a mid-epoch checkpoint every N steps, per-step logging) or inside
:func:`optimizer_step` (skipping a non-finite step).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import torch

from aimkp.train import distributed as D
from aimkp.train.run import TrainRun
from aimkp.train.stats import EpochStats
from aimkp.train.step import StepResult, aimkp_step, sft_step
from aimkp.train.step_log import StepLog

log = logging.getLogger("aimkp.train")


def epoch_order(run: TrainRun, epoch: int) -> list[int]:
    """Sample indices of ``epoch`` in training order (seeded with ``seed + epoch``)."""
    gen = torch.Generator().manual_seed(run.cfg.seed + epoch)
    return torch.randperm(len(run.samples), generator=gen).tolist()


def micro_step(run: TrainRun, indices: Sequence[int], n_total: float) -> StepResult:
    """One AimKP (or SFT) micro-step on the samples ``indices``; adds to ``.grad``."""
    cfg = run.cfg
    samples = [run.samples[i] for i in indices]
    if run.strides is None:
        return sft_step(
            run.loaded,
            samples,
            n_total,
            mask_mode=run.mask_mode,
            device=run.device,
            bf16=run.amp,
        )
    return aimkp_step(
        run.loaded,
        samples,
        indices,
        run.strides,
        n_total,
        tau_text=cfg.tau_text,
        tau_image=cfg.tau_image,
        reduce=cfg.gf_reduce,
        grand_threshold=cfg.grand_threshold,
        mask_mode=run.mask_mode,
        device=run.device,
        bf16=run.amp,
    )


def accumulate(run: TrainRun, global_idx: Sequence[int]) -> Iterator[StepResult]:
    """This rank's micro-steps of one optimizer step over the global batch ``global_idx``.

    Every rank divides by the answer tokens of the whole global batch, so the all-reduced sum
    of the ranks' gradients is the gradient of the global batch's mean loss."""
    n_total = float(sum(run.samples[i].n_answer_tokens for i in global_idx))
    idx = D.rank_share(global_idx, run.ctx)
    bs = run.cfg.batch_size
    for m in range(0, len(idx), bs):
        yield micro_step(run, idx[m : m + bs], n_total)


def optimizer_step(run: TrainRun) -> None:
    """Gradients summed over the ranks, clipped, one AdamW + schedule step, gradients cleared."""
    model = run.model
    D.all_reduce_grads(model.parameters(), run.ctx)
    if run.cfg.max_grad_norm is not None:
        run.grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], run.cfg.max_grad_norm
        )
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.progress.step += 1


class BackendLog:
    """Logs the backends that ran once, and again when the engine first runs (an SFT-like
    first step has no masked copies, hence no engine)."""

    def __init__(self) -> None:
        self.state: str | None = None  # None, "no-engine" or "done"

    def __call__(self, res: StepResult) -> None:
        if self.state == "done" or (self.state == "no-engine" and res.engine_backend is None):
            return
        log.info("backends: %s", backend_names(res))
        self.state = "no-engine" if res.engine_backend is None else "done"


def backend_names(res: StepResult) -> dict[str, str]:
    """What actually ran in the step's row forward (``res.ran``) and the engine."""
    ran = res.ran
    if ran is None:
        raise ValueError("the step result has no record of its row forward")
    from aimkp.models.attention import kernel_name

    kernel = kernel_name(ran.attention)
    return {
        "row_mode": ran.mode,
        "row_layout": ran.layout,
        "attention": ran.attention,
        **({} if kernel is None else {"varlen_kernel": kernel}),
        "masked_embedding": f"{ran.embedding} [{ran.embedding_backend}]",
        "grad_engine": res.engine_backend or "- (no masked copies in this step)",
    }


def run_epoch(
    run: TrainRun, epoch: int, backends: BackendLog, step_log: StepLog | None = None
) -> tuple[EpochStats, float]:
    """Train one epoch; returns this rank's totals and the epoch's wall time (seconds,
    including the strides' reconcile across ranks). ``step_log``: per-step rows
    (``--logging-steps``)."""
    from tqdm.auto import tqdm

    cfg, gb = run.cfg, run.global_batch
    order = epoch_order(run, epoch)
    t0 = time.perf_counter()
    stats = EpochStats()
    bar = tqdm(
        range(run.steps_per_epoch),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        disable=not run.is_main,
    )
    for s in bar:
        for res in accumulate(run, order[s * gb : (s + 1) * gb]):
            stats.add(res)
            backends(res)
            if step_log is not None:
                step_log.add(res)
        optimizer_step(run)
        if step_log is not None:  # per-step logging hook (--logging-steps)
            step_log.after_step(run, epoch)
        bar.set_postfix(**stats.progress(time.perf_counter() - t0))
    bar.close()
    if run.strides is not None:
        run.strides.reconcile()
    return stats, time.perf_counter() - t0
