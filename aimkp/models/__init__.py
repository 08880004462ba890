"""Model adapters, tiny presets, LoRA set-up, checkpoints and the packed row forward.

>>> from aimkp.models import load_model
>>> loaded = load_model("tiny-llava")           # built offline; or a LOCAL HF checkpoint dir
>>> sample = loaded.adapter.encode(record)      # EncodedSample with text / image spans

``load_model`` never downloads: a spec is a preset name, a local directory or a hub id
(``org/name``) found in the local Hugging Face cache (:mod:`aimkp.models.hub`).
"""

from __future__ import annotations

from aimkp.models.adapter import (
    QUESTION,
    EncodedSample,
    MLLMAdapter,
    register_adapter,
    unwrap_model,
)
from aimkp.models.checkpoint import save_checkpoint
from aimkp.models.forward import (
    ForwardRecord,
    RowBatch,
    RowLosses,
    collate_rows,
    flash_varlen_kwargs,
    forward_rows,
)
from aimkp.models.loading import LoadedModel, check_model_spec, load_model
from aimkp.models.registry import get_adapter
from aimkp.models.vision_cnn import CNNVisionConfig, CNNVisionModel  # registers the CNN tower

__all__ = [
    "QUESTION",
    "EncodedSample",
    "ForwardRecord",
    "RowBatch",
    "RowLosses",
    "collate_rows",
    "flash_varlen_kwargs",
    "forward_rows",
    "LoadedModel",
    "MLLMAdapter",
    "get_adapter",
    "check_model_spec",
    "CNNVisionConfig",
    "CNNVisionModel",
    "load_model",
    "register_adapter",
    "save_checkpoint",
    "unwrap_model",
]
