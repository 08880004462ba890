"""One training epoch: a seeded sample order, optimizer steps over accumulated micro-steps.

Per epoch a permutation seeded with ``seed + epoch`` (so resuming reproduces the order); per
optimizer step the same global batch on every rank, ``grad_accum`` micro-batches of
``batch_size`` samples of this rank's share, every loss weight divided by the answer tokens of
the whole global batch (:func:`accumulate`); then gradient all-reduce, the non-finite guard (a
non-finite or empty step is skipped), clipping, AdamW and the schedule (:func:`optimizer_step`);
then every ``--logging-steps`` a row of ``steps.csv`` (:class:`StepLogging`) and
:func:`after_step` (a mid-epoch ``last`` every ``--save-every`` steps, SIGINT / SIGTERM: save and
exit). A run resumed mid-epoch starts at ``progress.epoch_step`` with the epoch's partial totals
(:func:`resume_point`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from aimkp.method.step import StepResult, aimkp_step, sft_step
from aimkp.models.attention import kernel_name
from aimkp.runs.signals import StopRequest, exit_status
from aimkp.runs.state import Progress
from aimkp.runs.step_log import StepLog
from aimkp.spans import tap
from aimkp.train import distributed as D
from aimkp.train.run import TrainRun
from aimkp.train.stats import EpochStats

log = logging.getLogger("aimkp.train")


def epoch_order(run: TrainRun, epoch: int) -> list[int]:
    """Sample indices of ``epoch`` in training order (seeded with ``seed + epoch``)."""
    gen = torch.Generator().manual_seed(run.cfg.seed + epoch)
    return torch.randperm(len(run.samples), generator=gen).tolist()


def micro_step(run: TrainRun, indices: Sequence[int], n_total: float) -> StepResult:
    """One AimKP (or SFT) micro-step on the samples ``indices``; adds to ``.grad``."""
    samples = [run.samples[i] for i in indices]
    if run.strides is None:
        return sft_step(run.loaded, samples, n_total, run.step_options)
    return aimkp_step(run.loaded, samples, indices, run.strides, n_total, run.step_options)


def accumulate(run: TrainRun, global_idx: Sequence[int]) -> Iterator[StepResult]:
    """This rank's micro-steps of one optimizer step over the global batch ``global_idx``.

    Every rank divides by the answer tokens of the whole global batch, so the all-reduced sum
    of the ranks' gradients is the gradient of the global batch's mean loss."""
    n_total = float(sum(run.samples[i].n_answer_tokens for i in global_idx))
    idx = D.rank_share(global_idx, run.ctx)
    par = run.parallel  # --fsdp: every rank the same micro-steps and passes (lockstep)
    for chunk, last in par.micro_batches(idx, len(global_idx), run.cfg.batch_size):
        res = None
        with par.micro_step(run, last, pad_sample=global_idx[0]):
            if chunk:
                res = micro_step(run, chunk, n_total)
        if res is not None:
            yield res


def optimizer_step(run: TrainRun, used_rows: int) -> bool:
    """Gradients summed over the ranks, clipped, one AdamW + schedule step, gradients cleared.

    ``used_rows``: this rank's rows that reached ``.grad``. A step whose summed gradient is
    non-finite, or that used no row on any rank, is skipped (no AdamW step; the schedule still
    advances so the learning rate follows the data position); returns False then."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    finite, used_total = run.parallel.reduce_grads(params, used_rows)
    finite = tap("grads_finite", finite)
    ok = run.skip_guard.step_ok(used_total > 0 and finite, run.progress.step)
    run.grad_norm = None
    if ok:
        if run.cfg.max_grad_norm is not None:
            run.grad_norm = run.parallel.clip(params, run.cfg.max_grad_norm)
        run.optimizer.step()
    else:
        run.progress.skipped_steps += 1
    with warnings.catch_warnings():  # a skipped first step: "scheduler.step() before optimizer"
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.progress.step += 1
    return ok


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

    kernel = kernel_name(ran.attention)
    return {
        "row_mode": ran.mode,
        "row_layout": ran.layout,
        "attention": ran.attention,
        **({} if kernel is None else {"varlen_kernel": kernel}),
        "masked_embedding": f"{ran.embedding} [{ran.embedding_backend}]",
        "grad_engine": res.engine_backend or "- (no masked copies in this step)",
        **({} if res.reweight is None else {"reweight": res.reweight}),
    }


class StepLogging:
    """``--logging-steps N``: totals of the micro-steps since the last row; every N optimizer
    steps :meth:`after_step` makes the row of ``steps.csv`` and ``step_log`` writes it
    (``every`` None or 0: never)."""

    def __init__(self, run: TrainRun, step_log: StepLog) -> None:
        self.every = run.cfg.logging_steps
        self.step_log = step_log
        self._reset()

    def _reset(self) -> None:
        self.stats = EpochStats()
        self.t0 = time.perf_counter()

    def add(self, res: StepResult) -> None:
        if self.every:
            self.stats.add(res)

    def after_step(self, run: TrainRun, epoch: int) -> None:
        """After ``optimizer_step``: the row of the last N steps when ``run.progress.step`` is a
        multiple of N (every rank calls it: the counts are all-reduced)."""
        if not self.every or run.progress.step % self.every:
            return
        stats = self.stats.all_reduce(run.ctx)
        row = step_row(run, epoch, stats, time.perf_counter() - self.t0)
        self._reset()
        self.step_log.write(row)


def step_row(run: TrainRun, epoch: int, stats: EpochStats, seconds: float) -> dict[str, Any]:
    """The ``steps.csv`` row (:data:`aimkp.runs.step_log.COLUMNS`) of the steps that ``stats``
    totals over ``seconds``, after ``optimizer_step``."""
    epoch_row = stats.as_row(epoch=0, step=0, lr=0.0, seconds=max(seconds, 1e-9), n_samples=0)
    norm = getattr(run, "grad_norm", None)
    return {
        "step": run.progress.step,
        "epoch": epoch + 1,
        "loss": stats.train_loss,
        "lr": run.scheduler.get_last_lr()[0],
        "tokens_per_s": epoch_row["tokens_per_s"],
        "text_kept_rate": _blank_nan(epoch_row["text_kept_rate"]),
        "image_kept_rate": _blank_nan(epoch_row["image_kept_rate"]),
        "grad_norm": "" if norm is None else float(norm),
        "skipped_steps": int(getattr(run.progress, "skipped_steps", 0)),
    }


def _blank_nan(v: float) -> float | str:
    return "" if math.isnan(v) else v


def run_epoch(
    run: TrainRun,
    epoch: int,
    backends: BackendLog,
    stop: StopRequest | None = None,
    step_log: StepLogging | None = None,
) -> tuple[EpochStats, float]:
    """Train one epoch (from ``run.progress.epoch_step`` when resumed mid-epoch); returns this
    rank's totals and the epoch's wall time (seconds, including the strides' reconcile across
    ranks and, resumed, the time before the interruption). ``step_log``: per-step rows
    (``--logging-steps``)."""
    cfg, gb, p = run.cfg, run.global_batch, run.progress
    order = epoch_order(run, epoch)
    stats, t0 = resume_point(p)
    bar = tqdm(
        range(p.epoch_step, run.steps_per_epoch),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        disable=not run.is_main,
    )
    for s in bar:
        used = 0
        for res in accumulate(run, order[s * gb : (s + 1) * gb]):
            stats.add(res)
            backends(res)
            used += res.n_rows - res.nonfinite_rows
            if step_log is not None:
                step_log.add(res)
        if not optimizer_step(run, used):
            stats.nonfinite_skipped_steps += 1
        p.epoch_step = s + 1
        if step_log is not None:  # per-step logging hook (--logging-steps)
            step_log.after_step(run, epoch)
        bar.set_postfix(**stats.progress(time.perf_counter() - t0))
        after_step(run, stats, time.perf_counter() - t0, stop)
    bar.close()
    if run.strides is not None:
        run.strides.reconcile()
    return stats, time.perf_counter() - t0


def resume_point(p: Progress) -> tuple[EpochStats, float]:
    """The epoch's totals so far and its start time (``perf_counter``), from a mid-epoch
    checkpoint's ``partial`` (fresh totals and now otherwise)."""
    partial = dict(p.partial or {})
    seconds = float(partial.pop("seconds", 0.0))
    p.partial = None
    return EpochStats(**partial), time.perf_counter() - seconds


def after_step(run: TrainRun, stats: EpochStats, seconds: float, stop: StopRequest | None) -> None:
    """The hooks after each optimizer step: on SIGINT / SIGTERM save ``OUTPUT/last`` and exit
    (130 / 143); every ``--save-every`` steps a mid-epoch ``OUTPUT/last`` (the epoch's last
    step is saved by the end of the epoch)."""
    p, cfg = run.progress, run.cfg
    signum = None if stop is None else stop.agreed(run.ctx.any_rank)
    periodic = cfg.save_every is not None and p.step % cfg.save_every == 0
    if signum is None and not (periodic and p.epoch_step < run.steps_per_epoch):
        return
    with run.parallel.consolidated(run) as view:  # --fsdp: every rank takes part
        run.parallel.save_last(run, view, {**dataclasses.asdict(stats), "seconds": seconds})
    run.ctx.barrier()
    if signum is not None:
        if run.is_main:
            print(
                f"[aimkp train] stopped by {signal.Signals(signum).name} after step {p.step}; "
                f"saved {run.out / 'last'}; resume with: aimkp train --resume {run.out}",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(exit_status(signum))
