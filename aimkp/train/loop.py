"""The training loop of ``aimkp train``: a short driver over named phases.

Usage::

    aimkp train --preset tiny-llava --data default --output runs/demo --quick
    aimkp train --model /models/llava-1.5-7b-hf --data /data/cmkp --output runs/cmkp \\
        --epochs 4 --batch-size 8 --grad-accum 8 --bf16 --attn flash
    aimkp train ... --resume runs/cmkp            # continue exactly where it stopped

Phases: set-up and resume (:mod:`aimkp.train.run`), one epoch of AimKP or SFT optimizer steps
(:mod:`aimkp.train.epoch`, totals in :class:`aimkp.train.stats.EpochStats`), then at the end of
each epoch: totals over the ranks, greedy decoding on the validation split scored with the CMKP
protocol (:mod:`aimkp.train.evaluation`), best checkpoint by F1@1 + F1@3 + MAP@5
(``OUTPUT/best``), latest with the full training state (``OUTPUT/last``), one row per epoch in
``OUTPUT/metrics.csv`` (and the ``--report-to`` reporter), every ``--logging-steps`` optimizer
steps a row of ``OUTPUT/steps.csv`` (:mod:`aimkp.runs.step_log`); after the last epoch the optional
test-split comparison with the majority and untrained baselines.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from aimkp.runs.checkpoints import check_free_space, save_model
from aimkp.runs.lock import run_lock
from aimkp.runs.metrics_log import MetricsLog
from aimkp.runs.reporting import Reporter, make_reporter
from aimkp.runs.resume_check import check_resume_options
from aimkp.runs.signals import StopRequest
from aimkp.runs.state import load_trainable_state, read_train_state, trainable_state
from aimkp.runs.step_log import StepLog
from aimkp.train.config import TrainConfig
from aimkp.train.data import load_split
from aimkp.train.distributed import peer_loss_exits
from aimkp.train.epoch import BackendLog, StepLogging, run_epoch
from aimkp.train.evaluation import (
    baseline_scores,
    evaluate,
    majority_keyphrases,
    print_comparison,
    score_predictions,
)
from aimkp.train.run import (
    TrainRun,
    build_optimizer,
    build_scheduler,
    log_start,
    resume,
    set_up,
)
from aimkp.train.stats import EpochStats

if TYPE_CHECKING:
    from aimkp.models import LoadedModel

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "majority_keyphrases",
    "print_comparison",
    "score_predictions",
    "train",
]

log = logging.getLogger("aimkp.train")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; returns a summary dict (history, best score, paths). The run
    directory is locked for the run (rank 0; a second run into it is refused)."""
    with run_lock(cfg.output, enabled=int(os.environ.get("RANK", "0") or 0) == 0):
        with peer_loss_exits(cfg.dist_timeout):  # a rank died or hangs: one line, exit 4
            return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    state, changes = read_resume_state(cfg)  # options checked before anything loads
    run = set_up(cfg)
    run.resumed_changes = changes
    baselines = start(run, state)
    metrics = MetricsLog(run.out, enabled=run.is_main, reporter=reporter_of(run))
    backends = BackendLog()
    step_log = StepLogging(run, StepLog(run.out, metrics.reporter, enabled=run.is_main))
    with StopRequest() as stop:
        for epoch in range(run.progress.epoch, run.last_epoch):
            stats, seconds = run_epoch(run, epoch, backends, stop, step_log)
            end_epoch(run, epoch, stats.all_reduce(run.ctx), seconds, metrics)
    metrics.close()
    summary = summarize(run)
    if baselines and run.last_epoch == cfg.epochs:
        summary["baselines"] = compare_on_test(run, baselines)
    return summary


def read_resume_state(cfg: TrainConfig) -> tuple[dict[str, Any] | None, list[str]]:
    """With ``--resume``: the saved training state and the accepted option changes (UsageError
    naming every refused one, see :mod:`aimkp.runs.resume_check`)."""
    if not cfg.resume:
        return None, []

    state = read_train_state(cfg.resume)
    return state, check_resume_options(state["config"], cfg)


def reporter_of(run: TrainRun) -> Any:
    """The ``--report-to`` reporter on rank 0 (a no-op one on the others)."""
    if not run.is_main:
        return Reporter()
    return make_reporter(run.cfg.report_to, run.out, run.cfg.to_dict())


def start(run: TrainRun, state: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Resume from the saved ``state``, or score the baselines on the test split before
    training (when asked, on rank 0); save ``config.json``. Returns the baselines' scores ({}
    if none)."""
    cfg = run.cfg
    baselines: dict[str, dict[str, float]] = {}
    if state is not None:
        resume(run, state, str(cfg.resume))
    elif cfg.baselines and run.is_main:
        baselines = baseline_scores(run.loaded, run.train_records, load_test_split(cfg), cfg)
    if run.is_main:
        cfg.save(run.out / "config.json")
        check_free_space(run)
    log_start(run)
    return baselines


def end_epoch(
    run: TrainRun, epoch: int, stats: EpochStats, seconds: float, metrics: MetricsLog
) -> None:
    """Metrics row; on rank 0 also validation, best / last checkpoints and logs. The other
    ranks wait for rank 0 at the barrier."""
    row = epoch_row(run, epoch, stats, seconds)
    run.progress.epoch, run.progress.epoch_step = epoch + 1, 0
    validate = run.cfg.eval_every_epoch and bool(run.valid_records)
    # --fsdp: every rank takes part in gathering the weights, rank 0 gets a plain copy
    with run.parallel.consolidated(run, on_device=validate) as view:
        if run.is_main:
            if validate:
                row.update(validate_and_select(run, epoch, view))
            run.progress.history.append(row)
            metrics.write(row, run.progress.history)
        else:
            run.progress.history.append(row)
        run.parallel.save_last(run, view)
    run.ctx.barrier()


def epoch_row(run: TrainRun, epoch: int, stats: EpochStats, seconds: float) -> dict[str, Any]:
    """The epoch's metrics row: totals, rates and the PMM strides summary."""
    row = stats.as_row(
        epoch=epoch + 1,
        step=run.progress.step,
        lr=float(run.scheduler.get_last_lr()[0]),
        seconds=seconds,
        n_samples=len(run.samples),
    )
    if run.strides is not None:
        row.update(run.strides.summary())
    if run.resumed_changes:  # options changed by this resume (--allow-changed), recorded once
        row["resumed"] = "; ".join(run.resumed_changes)
        log.info("resumed with changed options: %s", row["resumed"])
        run.resumed_changes = []
    return row


def validate_and_select(
    run: TrainRun, epoch: int, loaded: LoadedModel | None = None
) -> dict[str, float]:
    """Validation scores (``valid_*``) of ``loaded`` (default ``run.loaded``; ``--fsdp``: rank
    0's consolidated copy); a new best score saves ``OUTPUT/best`` and keeps the trainable
    weights for the final test comparison."""
    loaded = loaded or run.loaded
    ev = evaluate(loaded, run.valid_records, run.cfg)
    p = run.progress
    if p.best_score is None or ev["score"] > p.best_score:
        p.best_score, p.best_epoch = ev["score"], epoch + 1
        run.best_state = trainable_state(loaded.model)
        save_model(run, "best", {"epoch": epoch + 1, "valid": ev}, loaded)
    return {f"valid_{k}": v for k, v in ev.items()}


def summarize(run: TrainRun) -> dict[str, Any]:
    p = run.progress
    return {
        "history": p.history,
        "best_score": p.best_score,
        "best_epoch": p.best_epoch,
        "output": str(run.out),
        "steps": p.step,
        "nonfinite_rows": sum(int(r.get("nonfinite_rows", 0)) for r in p.history),
        "nonfinite_skipped_steps": sum(int(r.get("nonfinite_skipped_steps", 0)) for r in p.history),
        "model": run.model,
        "loaded": run.loaded,
    }


def load_test_split(cfg: TrainConfig) -> list[Any]:
    """The test split, capped at ``eval_max_samples``."""
    return load_split(cfg, "test")[: cfg.eval_max_samples]


def compare_on_test(
    run: TrainRun, baselines: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Score the best epoch's weights on the test split next to the baselines; print the table
    and write ``OUTPUT/baselines.csv``."""
    recs = load_test_split(run.cfg)
    if run.best_state is not None:
        load_trainable_state(run.model, run.best_state)
    rows = {**baselines, "trained (best)": evaluate(run.loaded, recs, run.cfg)}
    print_comparison(rows, len(recs))
    MetricsLog.write_csv(run.out / "baselines.csv", [{"model": k, **v} for k, v in rows.items()])
    return rows
