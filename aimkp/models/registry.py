"""The adapter registry: which :class:`~aimkp.models.adapter.MLLMAdapter` serves a model.

The built-in adapters (LLaVA, Qwen2-VL / Qwen2.5-VL, Idefics3) register themselves with
:func:`~aimkp.models.adapter.register_adapter` when imported, which this module does; an adapter
of one's own registers the same way before a model of its type is loaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PreTrainedModel

from aimkp.models import idefics3, llava, qwen2vl  # noqa: F401 - they register themselves
from aimkp.models.adapter import REGISTRY, MLLMAdapter, unwrap_model

__all__ = ["adapter_class", "get_adapter", "model_class"]


def adapter_class(model_type: str) -> type[MLLMAdapter]:
    """The adapter class registered for a ``config.model_type``; ValueError when none is."""
    if model_type not in REGISTRY:
        raise ValueError(
            f"no aimkp adapter for model_type {model_type!r}; known: {sorted(REGISTRY)}"
        )
    return REGISTRY[model_type]


def get_adapter(
    model: nn.Module, tokenizer: Any = None, image_processor: Any = None
) -> MLLMAdapter:
    """Build the adapter for ``model`` (a HF multimodal model, possibly peft-wrapped)."""
    base = unwrap_model(model)
    cls = adapter_class(base.config.model_type)
    return cls(model, tokenizer, image_processor)


def model_class(model_type: str) -> type[PreTrainedModel]:
    """The ``*ForConditionalGeneration`` class of a ``config.model_type`` (its adapter's)."""
    cls = adapter_class(model_type).model_class
    if cls is None:
        raise ValueError(f"the adapter of model_type {model_type!r} names no model class")
    return cls
