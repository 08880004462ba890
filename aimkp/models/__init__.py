"""Model adapters, tiny presets, LoRA set-up, checkpoints and the packed row forward.

>>> from aimkp.models import load_model
>>> loaded = load_model("tiny-llava")           # built offline; or a LOCAL HF checkpoint dir
>>> sample = loaded.adapter.encode(record)      # EncodedSample with text / image spans

``load_model`` never downloads: a spec is a preset name or a local directory.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aimkp.models.adapter import (
    QUESTION,
    EncodedSample,
    MLLMAdapter,
    get_adapter,
    register_adapter,
    unwrap_model,
)
from aimkp.models.attention import apply_attention
from aimkp.models.checkpoint import save_checkpoint
from aimkp.models.forward import (
    RowBatch,
    RowLosses,
    collate_rows,
    flash_varlen_kwargs,
    forward_rows,
)

__all__ = [
    "QUESTION",
    "EncodedSample",
    "RowBatch",
    "RowLosses",
    "collate_rows",
    "flash_varlen_kwargs",
    "forward_rows",
    "LoadedModel",
    "MLLMAdapter",
    "get_adapter",
    "load_model",
    "register_adapter",
    "save_checkpoint",
    "unwrap_model",
]


@dataclass
class LoadedModel:
    """A model with everything needed around it.

    Attributes:
        model: the HF model (after :func:`aimkp.models.lora.apply_lora`, a peft wrapper).
        tokenizer: ``PreTrainedTokenizerFast``.
        image_processor: the architecture's image processor.
        adapter: the :class:`MLLMAdapter` bound to the three above.
        preset: preset name when built from one (kept in checkpoints), else None.
        info: free-form facts (source path, attention implementation, ...).
    """

    model: nn.Module
    tokenizer: Any
    image_processor: Any
    adapter: MLLMAdapter
    preset: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def set_model(self, model: nn.Module) -> None:
        """Replace the model (e.g. by its peft wrapper) and rebind the adapter."""
        self.model = model
        self.adapter.model = model

    @property
    def device(self) -> torch.device:
        return self.adapter.embed_tokens.weight.device


def _attn_name(attn: str, device: torch.device | str | None = None) -> str:
    from aimkp.models.attention import resolve_attention

    return resolve_attention(attn, device)


def load_model(
    spec: str | pathlib.Path,
    *,
    train_texts: list[str] | None = None,
    dtype: torch.dtype | None = None,
    attn: str = "sdpa",
    device: torch.device | str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a preset (``tiny-llava``, ``tiny-qwen2vl``, ``tiny-qwen25vl``, ``tiny-idefics3``) or
    a LOCAL checkpoint directory.

    Args:
        spec: preset name, an aimkp checkpoint written by ``save_checkpoint``, or a local
            Hugging Face LLaVA / Qwen2-VL / Qwen2.5-VL / Idefics3 (SmolVLM) directory. Nothing
            is ever downloaded.
        train_texts: texts the preset tokenizer is trained on (default: the default dataset).
        dtype: parameter dtype (default float32 for presets, the checkpoint's otherwise).
        attn: ``"auto"`` (varlen on CUDA where torch has the kernel, else sdpa), ``"sdpa"``,
            ``"varlen"`` (packed rows through :mod:`aimkp.models.attention`), ``"eager"`` or
            ``"flash"`` (flash-attn varlen; needs flash_attn).
        device: where to move the model.
        seed: initialisation seed of presets.
    """
    from aimkp.models.presets import PRESETS, build_preset

    impl = _attn_name(attn, device)
    spec_s = str(spec)
    if spec_s in PRESETS:
        model, tok, proc = build_preset(spec_s, train_texts, seed=seed)
        preset: str | None = spec_s
        info: dict[str, Any] = {"source": f"preset:{spec_s}"}
    elif pathlib.Path(spec_s).is_dir():
        from aimkp.models.checkpoint import load_local

        model, tok, proc, preset, info = load_local(pathlib.Path(spec_s), dtype=dtype, attn=impl)
    else:
        from aimkp.models.presets import PRESETS as _P

        raise ValueError(
            f"model spec {spec_s!r} is neither a preset ({sorted(_P)}) nor a local directory "
            "(nothing is downloaded)"
        )
    apply_attention(model, impl)
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None:
        model.to(device)
    info["attn"] = impl
    adapter = get_adapter(model, tok, proc)
    return LoadedModel(model, tok, proc, adapter, preset=preset, info=info)
