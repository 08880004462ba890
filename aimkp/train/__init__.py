"""AimKP training: PMM stride schedule (:mod:`.pmm`), Gradient-based Filtering decisions
(:mod:`.gf`), the one-backward AimKP step and the SFT step (:mod:`.step`), the published algorithm
(:mod:`.reference`), the training loop (:mod:`.loop`, a driver over set-up / resume in
:mod:`.run`, one epoch in :mod:`.epoch` with totals in :mod:`.stats`, scoring in
:mod:`.evaluation`, metrics rows in :mod:`.metrics_log`) and resumable state (:mod:`.state`).

Heavy modules (transformers, the engine) are imported only when a step or the loop runs.
"""

from __future__ import annotations

from aimkp.train.config import TrainConfig
from aimkp.train.gf import GFDecision, decide, pairs_of, provisional_weights
from aimkp.train.pmm import (
    StrideTable,
    build_keep,
    image_keep_offsets,
    reconcile_strides,
    text_keep_offsets,
)

__all__ = [
    "GFDecision",
    "StrideTable",
    "TrainConfig",
    "build_keep",
    "decide",
    "image_keep_offsets",
    "pairs_of",
    "provisional_weights",
    "reconcile_strides",
    "text_keep_offsets",
]
