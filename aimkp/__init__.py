"""aimkp: kernel-backed robust multimodal keyphrase generation (AimKP).

Heavy submodules are imported lazily: ``import aimkp`` touches neither triton, transformers nor
any device.

- :func:`aimkp.masked_embedding` / :class:`aimkp.MaskedEmbedding`: embedding lookup with fused
  token-level modality masking and vision-feature merge (``aimkp.ops``).
- :func:`aimkp.per_sample_grad_gram`: per-row gradient norms and pair inner products from one
  backward pass (``aimkp.engine``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "masked_embedding": "aimkp.ops.masked_embedding",
    "MaskedEmbedding": "aimkp.ops.masked_embedding",
    "per_sample_grad_gram": "aimkp.engine",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aimkp' has no attribute {name!r}")
