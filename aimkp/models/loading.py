"""Loading a model spec (a preset, a local checkpoint directory or a hub id in the local cache)
into a :class:`LoadedModel`: the model with its tokenizer, image processor and adapter."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from aimkp.errors import UsageError
from aimkp.models.adapter import MLLMAdapter
from aimkp.models.attention import apply_attention
from aimkp.models.checkpoint import (
    ADAPTER_CONFIG,
    adapter_base_name,
    load_local,
    resolve_base,
    validate_checkpoint,
)
from aimkp.models.hub import looks_like_hub_id, resolve_hub_id
from aimkp.models.registry import adapter_class, get_adapter

if TYPE_CHECKING:
    from collections.abc import Callable

    from aimkp.models.forward import RowBatch, RowLosses


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
        row_runner: what the training step runs its rows through instead of
            :func:`aimkp.models.forward.forward_rows` (``aimkp train --fsdp``: the FSDP2 root
            module, :class:`aimkp.train.fsdp.RowRunner`); None: ``forward_rows``.
    """

    model: nn.Module
    tokenizer: Any
    image_processor: Any
    adapter: MLLMAdapter
    preset: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    row_runner: Callable[[RowBatch], RowLosses] | None = field(default=None, repr=False)

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


def check_model_spec(spec: str | pathlib.Path) -> str:
    """``spec`` as a string when it is a preset name or a local checkpoint directory (one with a
    ``config.json``); a :class:`~aimkp.errors.UsageError` naming it otherwise. Reads no weights."""
    from aimkp.models.presets import PRESETS, check_preset

    spec_s = str(spec)
    if spec_s in PRESETS:
        check_preset(spec_s)
        return spec_s
    p = pathlib.Path(spec_s)
    if not p.exists() and _names_a_local_path(spec_s):
        raise UsageError(f"{spec_s}: no such checkpoint directory")
    if not p.exists() and looks_like_hub_id(spec_s):
        p = resolve_hub_id(spec_s)  # the local cache only; a UsageError when it is not there
    elif not p.exists():
        raise UsageError(
            f"model spec {spec_s!r} is neither a preset ({sorted(PRESETS)}), a local directory "
            "nor a hub id org/name in the local cache (nothing is downloaded)"
        )
    validate_checkpoint(p)  # truncated weights, invalid JSON, another LoRA rank: named now
    if p.is_dir() and (p / "config.json").is_file():
        _check_model_type(p / "config.json")
    elif p.is_dir() and (p / ADAPTER_CONFIG).is_file():
        resolve_base(adapter_base_name(p), p)  # the base it names must be here too
    else:
        raise UsageError(
            f"{spec_s}: no config.json and no {ADAPTER_CONFIG}; not a model checkpoint directory"
        )
    return spec_s


def _names_a_local_path(spec: str) -> bool:
    """True when ``spec`` can only mean a local path: absolute, ``./``, ``~``, more than one
    ``/``, a ``checkpoint-like`` last part (best, last, base, step-N), or under a directory that
    exists here (``runs/best`` with ``runs/`` present is not the hub id ``runs/best``)."""
    p = pathlib.Path(spec)
    if spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1:
        return True
    if p.name in ("best", "last", "base") or p.name.startswith("step-"):
        return True
    return spec.count("/") == 1 and p.parent.is_dir()


def _check_model_type(config_file: pathlib.Path) -> None:
    import json

    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise UsageError(f"{config_file}: not a readable JSON object ({exc})") from None
    try:
        adapter_class(str(model_type))
    except ValueError as exc:  # the registry's "no adapter for model_type ..." and nothing else
        raise UsageError(f"{config_file}: {exc}") from None


def _check_tokenizer(spec: str, model: nn.Module, tok: Any) -> None:
    """A tokenizer whose ids run past the model's input embedding rows belongs to another model."""
    get_embeddings = model.get_input_embeddings
    assert callable(get_embeddings)  # a transformers model's method, not a submodule attribute
    rows = get_embeddings().num_embeddings
    if len(tok) > rows:
        raise UsageError(
            f"{spec}: the tokenizer has {len(tok)} tokens but the model's input embedding has "
            f"{rows} rows: tokenizer and model do not belong together"
        )


def load_model(
    spec: str | pathlib.Path,
    *,
    train_texts: list[str] | None = None,
    dtype: torch.dtype | None = None,
    attn: str = "sdpa",
    device: torch.device | str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a preset (``tiny-llava``, ``tiny-qwen2vl``, ``tiny-qwen25vl``, ``tiny-idefics3``, the
    pretrained ``smol-llava``) or a LOCAL checkpoint directory.

    Args:
        spec: preset name, an aimkp checkpoint written by ``save_checkpoint`` (full weights or
            a peft adapter), a local Hugging Face LLaVA / Qwen2-VL / Qwen2.5-VL / Idefics3
            (SmolVLM) directory, or a hub id (``llava-hf/llava-1.5-7b-hf``) resolved from the
            local Hugging Face cache. Nothing is ever downloaded.
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
    spec_s = check_model_spec(spec)
    if spec_s in PRESETS:
        model, tok, proc = build_preset(spec_s, train_texts, seed=seed)
        preset: str | None = spec_s
        info: dict[str, Any] = {"source": f"preset:{spec_s}"}
    elif pathlib.Path(spec_s).is_dir():
        model, tok, proc, preset, info = load_local(pathlib.Path(spec_s), dtype=dtype, attn=impl)
        _check_tokenizer(spec_s, model, tok)
    else:  # a hub id: check_model_spec found it in the local cache
        snapshot = resolve_hub_id(spec_s)
        model, tok, proc, preset, info = load_local(snapshot, dtype=dtype, attn=impl)
        _check_tokenizer(spec_s, model, tok)
        info["hub_id"] = spec_s
    apply_attention(model, impl)
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None:
        model.to(device)
    info["attn"] = impl
    adapter = get_adapter(model, tok, proc)
    return LoadedModel(model, tok, proc, adapter, preset=preset, info=info)
