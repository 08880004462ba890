"""Per-step logging (``--logging-steps N``): every N optimizer steps one row of
``OUTPUT/steps.csv`` (appended, so a resumed run continues it; the header once, in a new file)
and the same scalars, prefixed ``step/``, to the ``--report-to`` reporter. Rank 0 writes; the
training loop makes the rows (``aimkp.train.epoch.StepLogging``: the counts summed over the
ranks).

Columns: ``step, epoch, loss`` (answer-token mean CE of the originals over the last N steps),
``lr`` (of the first parameter group, after the step), ``tokens_per_s`` (tokens fed to the model,
all ranks), ``text_kept_rate, image_kept_rate`` (kept / made masked copies; empty when none was
made), ``grad_norm`` (the total norm ``clip_grad_norm_`` returned for the last step; empty
without clipping), ``skipped_steps`` (non-finite steps skipped so far; 0 where the loop does not
count them).
"""

from __future__ import annotations

import csv
import pathlib
from typing import Any

from aimkp.runs.reporting import Reporter, numeric

COLUMNS = ("step", "epoch", "loss", "lr", "tokens_per_s", "text_kept_rate", "image_kept_rate",
           "grad_norm", "skipped_steps")  # fmt: skip


class StepLog:
    """Writes the rows of ``steps.csv`` (``enabled=False``: a no-op, for ranks other than 0)."""

    def __init__(self, out: pathlib.Path, reporter: Reporter, *, enabled: bool = True) -> None:
        self.path = out / "steps.csv"
        self.reporter = reporter
        self.enabled = enabled

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (the :data:`COLUMNS`) and log its numbers, ``step/``-prefixed."""
        if not self.enabled:
            return
        self._append(row)
        self.reporter.log({f"step/{k}": v for k, v in numeric(row, ("step",)).items()}, row["step"])

    def _append(self, row: dict[str, Any]) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)
