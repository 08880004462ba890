"""The options of one training micro-step, as one typed object.

:class:`StepOptions` is what :func:`aimkp.method.step.aimkp_step`,
:func:`~aimkp.method.step.sft_step` and :func:`aimkp.method.reference.reference_step` take.
``aimkp train`` builds it once from its :class:`~aimkp.train.config.TrainConfig`
(:func:`aimkp.train.run.step_options`), the Trainer integration from its
:class:`~aimkp.integrations.transformers.AimKPArguments`; both read every option from the field of
the same name (:meth:`StepOptions.from_fields`), so an option added here and to those two
reaches every caller.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from aimkp.choices import GF_REDUCE, MASK_MODES, REWEIGHT_WAYS, check_choices

__all__ = ["GF_REDUCE", "MASK_MODES", "REWEIGHT_WAYS", "StepOptions"]


@dataclass(frozen=True)
class StepOptions:
    """How a micro-step runs (defaults: the paper's thresholds, compact rows, fp32 on the CPU).

    Attributes:
        tau_text / tau_image: Gradient-based Filtering thresholds: a text / image-masked copy
            whose gradient cosine with its original's is below it is rejected.
        gf_reduce: ``"mean"`` of a sample's kept copies (reference code) or their ``"sum"``.
        grand_threshold: prune originals whose gradient-norm robust z-score exceeds it (None:
            no GraNd pruning).
        mask_mode: ``"compact"`` rows (hidden tokens dropped) or ``"attention"`` rows (full rows,
            hidden tokens masked); ``"auto"`` is ``"compact"``.
        reweight: how ``.grad`` gets the filter's weights: ``"stash"``, ``"correction"`` or
            ``"auto"`` (:mod:`aimkp.method.correction`).
        update_strides: update the PMM strides of the visited samples.
        device: where the rows run.
        amp_dtype: autocast dtype of the row forward on CUDA (None: no autocast).
    """

    tau_text: float = 0.1
    tau_image: float = 0.4
    gf_reduce: str = "mean"
    grand_threshold: float | None = None
    mask_mode: str = "compact"
    reweight: str = "stash"
    update_strides: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        # a str device ("cuda:0") is accepted and kept as a torch.device
        object.__setattr__(self, "device", torch.device(self.device))
        if self.mask_mode == "auto":
            object.__setattr__(self, "mask_mode", "compact")
        check_choices(self)
        if self.amp_dtype is not None and not isinstance(self.amp_dtype, torch.dtype):
            raise TypeError(f"amp_dtype must be a torch.dtype or None, got {self.amp_dtype!r}")

    @property
    def element_size(self) -> int:
        """Bytes per element of the row forward's activations (the autocast dtype's, else fp32)."""
        return 4 if self.amp_dtype is None else self.amp_dtype.itemsize

    @classmethod
    def from_fields(cls, source: Any, **overrides: Any) -> StepOptions:
        """The options of ``source`` (a ``TrainConfig``, ``AimKPArguments``, ...): each option
        ``source`` has an attribute of the same name for, then ``overrides`` (``device``,
        ``amp_dtype``: what the caller resolved); the defaults otherwise."""
        names = [f.name for f in dataclasses.fields(cls)]
        found = {n: getattr(source, n) for n in names if hasattr(source, n)}
        return cls(**{**found, **overrides})
