"""Export for serving engines that take a base model plus a LoRA adapter (vLLM).

>>> export_for_serving("runs/x/best", "serve/x")
serve/x/base/       config.json, model.safetensors (the TRAINED projector in place), tokenizer,
                    image processor, processor_config.json: a plain Hugging Face model directory
serve/x/adapter/    adapter_config.json, adapter_model.safetensors: the language-model LoRA only
                    (no ``modules_to_save``), keys under the Hugging Face module names of the
                    ``*ForConditionalGeneration`` class (``...model.language_model.layers.0
                    .self_attn.q_proj.lora_A.weight``)

Why not the training checkpoint as it is: aimkp trains the projector in full, which peft stores
as ``modules_to_save`` inside the adapter, and vLLM's LoRA loader does not accept
``modules_to_save`` weights (vllm-project/vllm#9280). The projector is therefore written into the
base, and the adapter keeps what vLLM applies per request: the LoRA factors of the language
model. ``base + adapter`` computes exactly what the checkpoint does (``PeftModel`` on ``base``
gives the same logits as aimkp's merged model, up to float rounding of the unmerged LoRA).

A checkpoint without LoRA (full fine-tuning, or ``aimkp export`` output) has nothing to serve as
an adapter: ``base/`` holds the whole model and no ``adapter/`` is written.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

from torch import nn

from aimkp.errors import CheckpointError
from aimkp.models.checkpoint import (
    ADAPTER_CONFIG,
    adapter_base_name,
    load_local,
    read_meta,
    resolve_base,
    save_adapter,
    save_full_weights,
    save_processors,
    write_meta,
)
from aimkp.models.loading import LoadedModel, load_model
from aimkp.models.registry import get_adapter

BASE_DIR = "base"
ADAPTER_DIR = "adapter"


def export_for_serving(
    checkpoint: str | pathlib.Path, output: str | pathlib.Path
) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Write ``checkpoint`` as ``output/base`` (+ ``output/adapter`` for a LoRA checkpoint);
    see the module docstring. Returns ``(base_dir, adapter_dir or None)``."""
    from aimkp.atomic import atomic_dir

    src, out = pathlib.Path(checkpoint), pathlib.Path(output)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the export directory must differ from the checkpoint")
    is_adapter = src.is_dir() and (src / ADAPTER_CONFIG).is_file()
    with atomic_dir(out) as tmp:  # written whole or not at all
        if is_adapter:
            _export_adapter_checkpoint(src, tmp, out)
        else:
            _save_base(load_model(src), tmp / BASE_DIR, src)
    return out / BASE_DIR, (out / ADAPTER_DIR if is_adapter else None)


def _export_adapter_checkpoint(src: pathlib.Path, tmp: pathlib.Path, out: pathlib.Path) -> None:
    """A peft checkpoint -> ``tmp/base`` (projector trained) + ``tmp/adapter`` (LoRA only);
    ``out`` is where ``tmp`` will be renamed to (what the adapter names as its base)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    base_dir = resolve_base(adapter_base_name(src), src)
    model, tok, proc, preset, _ = load_local(base_dir)
    peft_model = PeftModel.from_pretrained(model, str(src), is_trainable=False)
    config = peft_model.peft_config["default"]
    if not isinstance(config, LoraConfig):
        raise CheckpointError(f"{src}: a {type(config).__name__} adapter; only LoRA is served")
    lora = {k: v for k, v in get_peft_model_state_dict(peft_model).items() if "lora_" in k}
    # peft's unload puts the trained modules_to_save copy in place of the original projector
    plain: nn.Module = peft_model.unload()
    loaded = LoadedModel(plain, tok, proc, get_adapter(plain, tok, proc), preset=preset)
    meta = read_meta(src) or {}
    _save_base(loaded, tmp / BASE_DIR, src, meta.get("preset"))

    serve_config = copy.deepcopy(config)
    serve_config.modules_to_save = None
    served = get_peft_model(plain, serve_config)
    result = set_peft_model_state_dict(served, lora)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise CheckpointError(f"{src}: LoRA weights with no place in the model: {unexpected[:3]}")
    save_adapter(tmp / ADAPTER_DIR, served, str((out / BASE_DIR).resolve()))


def _save_base(loaded: LoadedModel, d: pathlib.Path, src: pathlib.Path, preset: Any = None) -> None:
    d.mkdir(parents=True)
    save_full_weights(d, loaded.model, loaded.model.state_dict())
    save_processors(d, loaded)
    loaded.preset = loaded.preset or preset
    write_meta(d, loaded, weights="full", lora=None, extra={"exported_from": str(src.resolve())})
