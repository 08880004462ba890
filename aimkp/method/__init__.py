"""The AimKP method: PMM stride schedule (:mod:`.pmm`), Gradient-based Filtering decisions
(:mod:`.gf`), the one-backward AimKP step and the SFT step (:mod:`.step`), the correction pass of
the no-stash reweight (:mod:`.correction`), non-finite row exclusion (:mod:`.nonfinite`) and the
published batch-size-1 algorithm (:mod:`.reference`)."""

from __future__ import annotations

from aimkp.method.gf import GFDecision, decide, pairs_of, provisional_weights
from aimkp.method.pmm import (
    StrideTable,
    build_keep,
    image_keep_offsets,
    reconcile_strides,
    text_keep_offsets,
)

__all__ = [
    "GFDecision",
    "StrideTable",
    "build_keep",
    "decide",
    "image_keep_offsets",
    "pairs_of",
    "provisional_weights",
    "reconcile_strides",
    "text_keep_offsets",
]
