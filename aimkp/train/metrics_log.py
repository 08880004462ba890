"""Where the epochs' metrics rows go: ``OUTPUT/metrics.csv``, TensorBoard (``OUTPUT/tb``, when
installed), the log and one ``[aimkp train]`` line on stdout. Rank 0 only."""

from __future__ import annotations

import csv
import logging
import pathlib
from typing import Any

log = logging.getLogger("aimkp.train")


class MetricsLog:
    """Writes each epoch's metrics row (``enabled=False``: a no-op, for ranks other than 0)."""

    def __init__(self, out: pathlib.Path, *, enabled: bool = True) -> None:
        self.out = out
        self.enabled = enabled
        self.writer = _tb_writer(out) if enabled else None

    def write(self, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.csv`` with ``history`` (ending with ``row``); log ``row``."""
        if not self.enabled:
            return
        self.write_csv(self.out / "metrics.csv", history)
        epoch = row["epoch"]
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, epoch)
        msg = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
        )
        log.info("epoch %d: %s", epoch, msg)
        print(f"[aimkp train] {msg}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

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


def _tb_writer(out: pathlib.Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(str(out / "tb"))
