"""Checkpoints: a (LoRA-)trained model saved merged, with tokenizer and image processor.

Layout of a checkpoint directory::

    config.json, model.safetensors     the model with LoRA merged into the base weights
                                       (a standard HF checkpoint: from_pretrained loads it)
    tokenizer.json, tokenizer_config.json, ...
    preprocessor_config.json
    aimkp.json                         {"format", "model_type", "adapter", "preset", "lora",
                                        "extra"}

``load_model(dir)`` (``aimkp.models.load_model``) reads it back with ``local_files_only=True``;
it also reads plain local Hugging Face LLaVA / Qwen2-VL directories (no ``aimkp.json``).
"""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from aimkp.models.adapter import adapter_class, unwrap_model

if TYPE_CHECKING:
    from aimkp.models import LoadedModel

META = "aimkp.json"
FORMAT = 1


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the base model with every active LoRA delta merged into its base weight.

    Works on a peft-wrapped model without modifying it (training can go on afterwards).
    Keys are those of the plain base model (``...q_proj.weight``, no ``base_layer`` / ``lora_``).
    """
    base = unwrap_model(model)
    state = base.state_dict()
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in _lora_layers(base):
        if getattr(layer, "merged", False):
            continue
        for adapter_name in getattr(layer, "active_adapters", []):
            if adapter_name not in getattr(layer, "lora_A", {}):
                continue
            d = layer.get_delta_weight(adapter_name).detach()
            key = f"{name}.weight"
            deltas[key] = deltas[key] + d if key in deltas else d
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        k2 = k.replace(".base_layer.", ".")
        v = v.detach()
        if k2 in deltas:
            v = (v.float() + deltas[k2].float()).to(v.dtype)
        out[k2] = v.contiguous()
    return out


def _lora_info(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return None
    c = next(iter(cfg.values()))
    return {
        "r": int(c.r),
        "alpha": float(c.lora_alpha),
        "dropout": float(c.lora_dropout),
        "merged": True,
    }


def save_checkpoint(
    directory: str | pathlib.Path, loaded: LoadedModel, extra_json: dict[str, Any] | None = None
) -> pathlib.Path:
    """Write ``loaded`` (a :class:`aimkp.models.LoadedModel`) to ``directory`` (merged weights).

    ``extra_json`` (JSON-serialisable, e.g. the training config and metrics) is stored under
    ``"extra"`` in ``aimkp.json``. Returns the directory.
    """
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    base = unwrap_model(loaded.model)
    state = merged_state_dict(loaded.model)
    cls = adapter_class(base.config.model_type).model_class
    # Save through a clean instance of the class so no peft module structure leaks in.
    with torch.device("meta"):
        clean = cls(base.config)
    missing = set(clean.state_dict()) - set(state)
    if missing:
        raise ValueError(f"merged state dict lacks {sorted(missing)[:5]}")
    clean.load_state_dict(state, assign=True, strict=True)
    clean.generation_config = base.generation_config
    clean.save_pretrained(d, safe_serialization=True)
    loaded.tokenizer.save_pretrained(d)
    if loaded.image_processor is not None:
        loaded.image_processor.save_pretrained(d)
    meta = {
        "format": FORMAT,
        "model_type": base.config.model_type,
        "adapter": type(loaded.adapter).__name__,
        "preset": loaded.preset,
        "lora": _lora_info(loaded.model),
        "extra": extra_json,
    }
    (d / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return d


def read_meta(directory: str | pathlib.Path) -> dict[str, Any] | None:
    """The ``aimkp.json`` of a checkpoint directory (None for a plain HF directory)."""
    p = pathlib.Path(directory) / META
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc


def _chat_template_file(d: pathlib.Path) -> str | None:
    """A processor-level chat template (llava-hf keeps it beside, not in, the tokenizer)."""
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = d / "chat_template.json"
    if js.is_file():
        try:
            return json.loads(js.read_text()).get("chat_template")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{js}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    return None


def load_local(
    directory: pathlib.Path, *, dtype: torch.dtype | None = None, attn: str = "sdpa"
) -> tuple[nn.Module, Any, Any, str | None, dict[str, Any]]:
    """Load (model, tokenizer, image processor, preset, info) from a local directory, offline."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    d = pathlib.Path(directory)
    if not (d / "config.json").is_file():
        raise ValueError(f"{d}: no config.json; not a model checkpoint directory")
    meta = read_meta(d)
    config = AutoConfig.from_pretrained(d, local_files_only=True)
    cls = adapter_class(config.model_type).model_class
    kw: dict[str, Any] = {"local_files_only": True, "attn_implementation": attn}
    if dtype is not None:
        kw["dtype"] = dtype
    model = cls.from_pretrained(d, **kw)
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    if not getattr(tok, "chat_template", None):
        tmpl = _chat_template_file(d)
        if tmpl:
            tok.chat_template = tmpl
    try:
        proc = AutoImageProcessor.from_pretrained(d, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{d}: cannot load the image processor ({exc})") from exc
    preset = meta.get("preset") if meta else None
    info = {"source": str(d), "aimkp": meta}
    return model, tok, proc, preset, info
