"""aimkp: kernel-backed robust multimodal keyphrase generation (AimKP).

Heavy submodules are imported lazily: ``import aimkp`` touches neither triton, transformers nor
any device.

- :func:`aimkp.masked_embedding` / :class:`aimkp.MaskedEmbedding`: embedding lookup with fused
  token-level modality masking and vision-feature merge (``aimkp.ops``).
- :func:`aimkp.per_sample_grad_gram`: per-row gradient norms and pair inner products from one
  backward pass (``aimkp.engine``).
- The AimKP step and what it needs (``examples/minimal_aimkp.py`` uses only these):
  :func:`aimkp.load_dataset`, :func:`aimkp.load_model`, :func:`aimkp.apply_lora`,
  :class:`aimkp.StrideTable` (the PMM schedule), :class:`aimkp.StepOptions`,
  :func:`aimkp.aimkp_step` / :func:`aimkp.sft_step` (one micro-step into ``.grad``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "masked_embedding": "aimkp.ops.masked_embedding",
    "MaskedEmbedding": "aimkp.ops.masked_embedding",
    "per_sample_grad_gram": "aimkp.engine",
    "load_dataset": "aimkp.data",
    "load_model": "aimkp.models",
    "apply_lora": "aimkp.models.lora",
    "StrideTable": "aimkp.method.pmm",
    "StepOptions": "aimkp.method.options",
    "StepResult": "aimkp.method.step",
    "aimkp_step": "aimkp.method.step",
    "sft_step": "aimkp.method.step",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aimkp' has no attribute {name!r}")
