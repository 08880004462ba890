"""Where the epochs' metrics rows go: ``OUTPUT/metrics.csv``, the ``--report-to`` reporter
(:mod:`aimkp.runs.reporting`; by default TensorBoard under ``OUTPUT/tb`` when installed), the
log and one ``[aimkp train]`` line on stdout. Rank 0 only."""

from __future__ import annotations

import csv
import logging
import pathlib
from typing import Any

from aimkp.runs.reporting import Reporter, numeric

log = logging.getLogger("aimkp.train")


class MetricsLog:
    """Writes each epoch's metrics row (``enabled=False``: a no-op, for ranks other than 0)."""

    def __init__(
        self, out: pathlib.Path, *, enabled: bool = True, reporter: Reporter | None = None
    ) -> None:
        self.out = out
        self.enabled = enabled
        self.reporter = reporter if (enabled and reporter is not None) else Reporter()

    def write(self, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.csv`` with ``history`` (ending with ``row``); log ``row``."""
        if not self.enabled:
            return
        self.write_csv(self.out / "metrics.csv", history)
        epoch = row["epoch"]
        self.reporter.log(numeric(row, ("epoch",)), epoch)
        msg = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
        )
        log.info("epoch %d: %s", epoch, msg)
        print(f"[aimkp train] {msg}", flush=True)

    def close(self) -> None:
        self.reporter.close()

    @staticmethod
    def write_csv(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
        """CSV with the union of the rows' keys as columns (first appearance order)."""
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
