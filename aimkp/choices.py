"""The closed sets of values the step's options take, shared by :class:`aimkp.train.TrainConfig`
(``aimkp train``'s flags), :class:`aimkp.method.options.StepOptions` and the Trainer integration,
and the ``--report-to`` choices (the config's field and :mod:`aimkp.runs.reporting`).
Torch-free, so that the command line parses its flags without importing torch."""

from __future__ import annotations

from typing import Any

GF_REDUCE = ("mean", "sum")  # --gf-reduce: mean of the kept copies (reference code) or their sum
MASK_MODES = ("compact", "attention", "auto")  # --mask-mode; auto is compact
REWEIGHT_WAYS = ("auto", "stash", "correction")  # --reweight: aimkp.method.correction
REPORT_TO = ("auto", "tensorboard", "wandb", "none")  # --report-to: aimkp.runs.reporting

#: The step options that take one of a closed set of values, and that set.
STEP_CHOICES = {"gf_reduce": GF_REDUCE, "mask_mode": MASK_MODES, "reweight": REWEIGHT_WAYS}


def check_choices(options: Any, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming the first of ``options``' :data:`STEP_CHOICES` fields whose value
    is not one of its choices."""
    for name, allowed in STEP_CHOICES.items():
        value = getattr(options, name)
        if value not in allowed:
            raise error(f"{name} must be one of {allowed}, got {value!r}")
