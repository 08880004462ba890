"""The training loop: a driver (:mod:`.loop`) over set-up / resume (:mod:`.run`), one epoch
(:mod:`.epoch`) with totals (:mod:`.stats`), scoring (:mod:`.evaluation`), the data-parallel
helpers (:mod:`.distributed`) and its configuration (:mod:`.config`). The method it runs lives in
:mod:`aimkp.method`, what a run directory holds in :mod:`aimkp.runs`; signal handling
(:mod:`.signals`), resume checks (:mod:`.resume_check`) and the metrics / step logs
(:mod:`.metrics_log`, :mod:`.step_log`) are the loop's own."""

from __future__ import annotations

from aimkp.train.config import TrainConfig

__all__ = ["TrainConfig"]
