"""The closed sets of values the step's options take, shared by :class:`aimkp.train.TrainConfig`
(``aimkp train``'s flags), :class:`aimkp.method.options.StepOptions` and the Trainer integration.
Torch-free, so that the command line parses its flags without importing torch."""

from __future__ import annotations

GF_REDUCE = ("mean", "sum")  # --gf-reduce: mean of the kept copies (reference code) or their sum
MASK_MODES = ("compact", "attention", "auto")  # --mask-mode; auto is compact
REWEIGHT_WAYS = ("auto", "stash", "correction")  # --reweight: aimkp.method.correction
