"""The training loop: a driver (:mod:`.loop`) over set-up / resume (:mod:`.run`), one epoch
(:mod:`.epoch`) with totals (:mod:`.stats`), scoring (:mod:`.evaluation`), the data-parallel
helpers (:mod:`.distributed`, :mod:`.fsdp`) and its configuration (:mod:`.config`). The method it
runs lives in :mod:`aimkp.method`; what a run directory holds, signal handling, resume checks
and the metrics / step logs in :mod:`aimkp.runs`."""

from __future__ import annotations

from aimkp.train.config import TrainConfig

__all__ = ["TrainConfig"]
