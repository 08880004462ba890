"""The merged export of a checkpoint (LoRA merged into a standard HF directory). The adapter
checkpoints themselves (peft's format) are written and read by :mod:`aimkp.models.checkpoint`.

>>> save_checkpoint("runs/x/best", loaded)   # adapter_config.json, adapter_model.safetensors
>>> base = AutoModelForImageTextToText.from_pretrained(cfg["base_model_name_or_path"])
>>> model = PeftModel.from_pretrained(base, "runs/x/best")     # plain peft, no aimkp needed
>>> export_merged("runs/x/best", "runs/x/merged")    # a standard HF directory, LoRA merged

The base an adapter names (``base_model_name_or_path``) is the directory the model was loaded
from, a hub id resolved from the local cache, or, for presets (built in memory, so nothing on disk
to name), a copy of the INITIAL base saved once per run under ``OUTPUT/base``. Only the trainable
part (LoRA factors, projector) is written per checkpoint: for LLaVA-1.5-7B at r=128, 341 M fp32
parameters (1.4 GB) instead of 7.1 B merged ones (14 GB in fp16).
"""

from __future__ import annotations

import pathlib

import torch

from aimkp.atomic import atomic_dir
from aimkp.errors import CheckpointError
from aimkp.models.checkpoint import save_checkpoint
from aimkp.models.loading import load_model


def export_merged(
    checkpoint: str | pathlib.Path,
    output: str | pathlib.Path,
    *,
    dtype: torch.dtype | None = None,
) -> pathlib.Path:
    """Write ``checkpoint`` (adapter or full) as a standard HF directory with LoRA merged, that
    ``AutoModelForImageTextToText.from_pretrained(output)`` loads (plus tokenizer, image
    processor, the ``AutoProcessor`` of the architecture and ``aimkp.json``). Returns
    ``output``."""
    src, out = pathlib.Path(checkpoint), pathlib.Path(output)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the export directory must differ from the checkpoint")
    loaded = load_model(src, dtype=dtype)
    origin = str(src.resolve()) if src.is_dir() else str(checkpoint)  # a dir or a hub id
    with atomic_dir(out) as tmp:  # written whole or not at all (a full disk keeps nothing half)
        save_checkpoint(tmp, loaded, extra_json={"exported_from": origin})
    return out
