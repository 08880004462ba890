"""Per-step logging (``--logging-steps N``): every N optimizer steps one row of
``OUTPUT/steps.csv`` (appended, so a resumed run continues it) and the same scalars, prefixed
``step/``, to the ``--report-to`` reporter. Rank 0 writes; the counts are summed over the ranks.

Columns: ``step, epoch, loss`` (answer-token mean CE of the originals over the last N steps),
``lr`` (of the first parameter group, after the step), ``tokens_per_s`` (tokens fed to the model,
all ranks), ``text_kept_rate, image_kept_rate`` (kept / made masked copies; empty when none was
made), ``grad_norm`` (the total norm ``clip_grad_norm_`` returned for the last step; empty
without clipping), ``skipped_steps`` (non-finite steps skipped so far; 0 where the loop does not
count them).
"""

from __future__ import annotations

import csv
import math
import time
from typing import TYPE_CHECKING

from aimkp.runs.reporting import numeric
from aimkp.train.stats import EpochStats

if TYPE_CHECKING:
    from aimkp.method.step import StepResult
    from aimkp.runs.reporting import Reporter
    from aimkp.train.run import TrainRun

COLUMNS = ("step", "epoch", "loss", "lr", "tokens_per_s", "text_kept_rate", "image_kept_rate",
           "grad_norm", "skipped_steps")  # fmt: skip


class StepLog:
    """Counts the micro-steps since the last row; :meth:`after_step` writes one every N steps
    (``every`` None or 0: never)."""

    def __init__(self, run: TrainRun, reporter: Reporter) -> None:
        self.every = run.cfg.logging_steps
        self.reporter = reporter
        self.path = run.out / "steps.csv"
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
        row = self.row(run, epoch, stats, time.perf_counter() - self.t0)
        self._reset()
        if run.is_main:
            self._append(row)

            self.reporter.log(
                {f"step/{k}": v for k, v in numeric(row, ("step",)).items()}, row["step"]
            )

    @staticmethod
    def row(run: TrainRun, epoch: int, stats: EpochStats, seconds: float) -> dict:
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

    def _append(self, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)


def _blank_nan(v: float) -> float | str:
    return "" if math.isnan(v) else v
