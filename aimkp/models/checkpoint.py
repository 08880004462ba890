"""Checkpoints: full weights, or (LoRA) a peft adapter beside a named base model.

A LoRA checkpoint is peft's own format, so ``PeftModel.from_pretrained(base, DIR)`` loads it::

    adapter_config.json              peft's LoraConfig; ``base_model_name_or_path`` names the base:
                                     the local ``--model`` directory, a hub id, or (presets) the
                                     copy of the initial base saved once per run in ``OUTPUT/base``
    adapter_model.safetensors        the LoRA factors and the projector (``modules_to_save``)
    tokenizer.json, ..., preprocessor_config.json
    processor_config.json            the adapter's ``transformers`` processor (LlavaProcessor, ...),
                                     so ``AutoProcessor.from_pretrained(DIR)`` returns it
    aimkp.json                       {"format", "weights": "peft", "base", "model_type", "adapter",
                                      "preset", "lora", "extra"}

A full fine-tuning checkpoint (and ``aimkp export`` output, and checkpoints of format 1, which
held LoRA merged) is a standard HF directory: ``config.json, model.safetensors``, tokenizer, image
processor, ``aimkp.json`` with ``"weights": "full"``.

``load_model(dir)`` (``aimkp.models.load_model``) reads either back with ``local_files_only=True``
(an adapter merged into its base with peft's ``merge_and_unload``); it also reads plain local
Hugging Face LLaVA / Qwen2-VL / Idefics3 directories (no ``aimkp.json``).
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

from aimkp.atomic import apply_umask, atomic_dir
from aimkp.errors import CheckpointError
from aimkp.models.adapter import unwrap_model
from aimkp.models.hub import looks_like_hub_id, resolve_hub_id
from aimkp.models.registry import model_class

if TYPE_CHECKING:
    from peft import PeftModel

    from aimkp.models import LoadedModel

log = logging.getLogger("aimkp.models")

META = "aimkp.json"
PROCESSOR_CONFIG = "processor_config.json"
FORMAT = 2
ADAPTER_CONFIG = "adapter_config.json"
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")


def _lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    # peft's LoraLayer subclasses (Linear, Embedding, ...) each define get_delta_weight; the
    # LoraLayer base class does not, so the layers are typed Any
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def is_peft_model(model: nn.Module) -> TypeGuard[PeftModel]:
    """True for a peft wrapper (``apply_lora`` with LoRA), False for a plain HF model."""
    return bool(getattr(model, "peft_config", None))


def _plain_key(key: str, trained: bool) -> str | None:
    """The plain-model key of a peft-wrapped state key, or None when it has no place there.

    ``trained``: the projector copy peft trains (``modules_to_save``) replaces the original;
    otherwise the original (initial) projector is kept and the copy dropped."""
    if ".lora_" in key:
        return None
    key = key.replace(".base_layer.", ".")
    if ".original_module." in key:
        return None if trained else key.replace(".original_module.", ".")
    if _MODULES_TO_SAVE.search(key):
        return _MODULES_TO_SAVE.sub(".", key) if trained else None
    return key


def merged_state_dict(model: nn.Module, trained: bool = True) -> dict[str, torch.Tensor]:
    """State dict of the plain base model, from a plain or a peft-wrapped model (not modified).

    ``trained=True``: every active LoRA delta merged into its base weight and the trained
    projector copy in place of the original (what peft's ``merge_and_unload`` gives).
    ``trained=False``: the initial base (LoRA and the projector copy dropped).
    Keys are those of the plain base model (``...q_proj.weight``, no ``base_layer`` / ``lora_``).
    """
    base = unwrap_model(model)
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in _lora_layers(base) if trained else []:
        if getattr(layer, "merged", False):
            continue
        for adapter_name in getattr(layer, "active_adapters", []):
            if adapter_name not in getattr(layer, "lora_A", {}):
                continue
            d = layer.get_delta_weight(adapter_name).detach()
            key = f"{name}.weight"
            deltas[key] = deltas[key] + d if key in deltas else d
    out: dict[str, torch.Tensor] = {}
    for k, v in base.state_dict().items():
        k2 = _plain_key(k, trained)
        if k2 is None:
            continue
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
        "merged": False,
    }


def save_full_weights(
    directory: pathlib.Path, model: nn.Module, state: dict[str, torch.Tensor]
) -> None:
    """``config.json`` + ``model.safetensors`` of ``state`` (plain keys) in ``directory``."""
    base = unwrap_model(model)
    cls = model_class(base.config.model_type)
    # Save through a clean instance of the class so no peft / aimkp module structure leaks in.
    with torch.device("meta"):
        clean = cls(base.config)
    missing = set(clean.state_dict()) - set(state)
    if missing:
        raise ValueError(f"merged state dict lacks {sorted(missing)[:5]}")
    clean.load_state_dict(state, assign=True, strict=True)
    clean.generation_config = base.generation_config
    clean.save_pretrained(directory, safe_serialization=True)


def save_processors(directory: pathlib.Path, loaded: LoadedModel) -> None:
    """The tokenizer and image processor of ``loaded`` into ``directory``, and the adapter's
    ``transformers`` processor over them (``processor_config.json``, chat template) so that
    ``AutoProcessor.from_pretrained(directory)`` works; a processor that cannot be built for
    this architecture (or this transformers install) is logged and left out."""
    loaded.tokenizer.save_pretrained(directory)
    if loaded.image_processor is not None:
        loaded.image_processor.save_pretrained(directory)
    (directory / PROCESSOR_CONFIG).unlink(missing_ok=True)  # never a stale one from an older save
    try:
        processor = loaded.adapter.build_processor()
        if processor is not None:
            processor.save_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 - e.g. Qwen2-VL's needs torchvision for video
        log.warning(
            "%s: no processor_config.json (%s: %s); AutoProcessor cannot load this directory, "
            "the tokenizer and image processor are saved on their own",
            directory,
            type(exc).__name__,
            exc,
        )


def write_meta(directory: pathlib.Path, loaded: LoadedModel, **fields: Any) -> None:
    """``aimkp.json``: format, model type, adapter, preset and ``fields``."""
    base = unwrap_model(loaded.model)
    meta = {
        "format": FORMAT,
        "model_type": base.config.model_type,
        "adapter": type(loaded.adapter).__name__,
        "preset": loaded.preset,
        **fields,
    }
    (directory / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


def save_checkpoint(
    directory: str | pathlib.Path,
    loaded: LoadedModel,
    extra_json: dict[str, Any] | None = None,
    *,
    base_dir: str | pathlib.Path | None = None,
) -> pathlib.Path:
    """Write ``loaded`` (a :class:`aimkp.models.LoadedModel`) to ``directory``.

    With LoRA: peft's adapter format, naming the base (see the module docstring); a preset's base
    is saved once per loaded model to ``base_dir`` (default: ``directory/base``; the training
    loop passes ``OUTPUT/base`` for ``OUTPUT/best`` and ``OUTPUT/last``). Without LoRA: full
    weights. ``extra_json`` (JSON-serialisable, e.g. the
    training config and metrics) is stored under ``"extra"`` in ``aimkp.json``. Returns the
    directory.
    """
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fields: dict[str, Any] = {"lora": _lora_info(loaded.model), "extra": extra_json}
    if is_peft_model(loaded.model):
        base = base_reference(loaded, pathlib.Path(base_dir) if base_dir else d / "base")
        save_adapter(d, loaded.model, base)
        fields.update(weights="peft", base=base)
    else:
        remove_stale_adapter(d)
        save_full_weights(d, loaded.model, merged_state_dict(loaded.model))
        fields.update(weights="full")
    save_processors(d, loaded)
    write_meta(d, loaded, **fields)
    apply_umask(d, "*.safetensors")  # safetensors writes 0600: others could not read them
    return d


ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_json_file(path: pathlib.Path) -> Any:
    """The JSON of ``path``; CheckpointError naming the file and line when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None


def safetensors_shapes(path: pathlib.Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file declares, after checking that the file is whole:
    its header parses and the file holds every byte the header's offsets name (a copy or a
    save cut short fails here, in one line, instead of deep inside the loader)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file ({size} bytes, no whole header)"
                )
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (malformed header)")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in entries.items()}
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path}: not a safetensors file (malformed header)") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: its header names {8 + n + end} bytes, the file holds {size} "
            "(an interrupted copy or save); copy or save it again"
        )
    return shapes


def _check_adapter(d: pathlib.Path) -> None:
    cfg = read_json_file(d / ADAPTER_CONFIG)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: not a JSON object")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: 'r' must be a positive integer, got {r!r}")
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{d}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")
    ranks = {r, *(v for v in (cfg.get("rank_pattern") or {}).values() if isinstance(v, int))}
    for key, shape in safetensors_shapes(weights).items():
        rank = shape[0] if ".lora_A." in key else shape[-1] if ".lora_B." in key else None
        if rank is not None and len(shape) == 2 and rank not in ranks:
            raise CheckpointError(
                f"{weights}: LoRA weights of rank {rank} ({key}) but {ADAPTER_CONFIG} says "
                f"r={r}: the weights belong to another adapter"
            )


def _check_full(d: pathlib.Path) -> None:
    read_json_file(d / "config.json")
    if (d / "model.safetensors").is_file():
        safetensors_shapes(d / "model.safetensors")
    elif (d / SAFETENSORS_INDEX).is_file():
        index = read_json_file(d / SAFETENSORS_INDEX)
        shards = (
            sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        )
        for shard in shards:
            if not (d / shard).is_file():
                raise CheckpointError(
                    f"{d}: the shard {shard} named in {SAFETENSORS_INDEX} is missing"
                )
            safetensors_shapes(d / shard)


def validate_checkpoint(directory: str | pathlib.Path) -> None:
    """CheckpointError (one line, naming the file) when a checkpoint directory cannot be loaded
    whole: invalid JSON in ``adapter_config.json`` / ``config.json`` / ``aimkp.json``, a
    truncated or malformed safetensors file, LoRA weights of another rank than the config's, a
    missing shard. Reads the headers only, so every command checks before any work
    (``predict``, ``evaluate``, ``export``, ``train --resume``, ``train --model DIR``)."""
    d = pathlib.Path(directory)
    read_meta(d)
    if (d / ADAPTER_CONFIG).is_file():
        _check_adapter(d)
    elif (d / "config.json").is_file():
        _check_full(d)


def read_meta(directory: str | pathlib.Path) -> dict[str, Any] | None:
    """The ``aimkp.json`` of a checkpoint directory (None for a plain HF directory)."""
    p = pathlib.Path(directory) / META
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc


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
            raise CheckpointError(f"{js}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    return None


def load_local(
    directory: pathlib.Path, *, dtype: torch.dtype | None = None, attn: str = "sdpa"
) -> tuple[nn.Module, Any, Any, str | None, dict[str, Any]]:
    """Load (model, tokenizer, image processor, preset, info) from a local directory, offline."""
    from transformers import AutoConfig

    d = pathlib.Path(directory)
    validate_checkpoint(d)  # a truncated or mismatched file named before anything loads
    if (d / ADAPTER_CONFIG).is_file():
        return load_adapter_checkpoint(d, dtype=dtype, attn=attn)
    if not (d / "config.json").is_file():
        raise CheckpointError(
            f"{d}: no config.json and no {ADAPTER_CONFIG}; not a model checkpoint directory"
        )
    meta = read_meta(d)
    config = AutoConfig.from_pretrained(d, local_files_only=True)
    cls = model_class(config.model_type)
    # safetensors only: pickled ``.bin`` weights could run code when loaded
    kw: dict[str, Any] = {
        "local_files_only": True,
        "attn_implementation": attn,
        "use_safetensors": True,
    }
    if dtype is not None:
        kw["dtype"] = dtype
    try:
        model = cls.from_pretrained(d, **kw)
    except OSError as exc:  # no (or an unreadable) model.safetensors
        raise CheckpointError(
            f"{d}: cannot load the weights ({exc}); aimkp reads safetensors weights only "
            "(pickled .bin weights could run code when loaded)"
        ) from None
    tok, proc = load_processors(d)
    preset = meta.get("preset") if meta else None
    info = {"source": str(d), "aimkp": meta}
    return model, tok, proc, preset, info


def load_processors(d: pathlib.Path) -> tuple[Any, Any]:
    """(tokenizer, image processor) of a local directory, offline: those of its
    ``AutoProcessor`` when it has a ``processor_config.json``, else each on its own (older
    checkpoints, plain HF directories without one)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        if (d / PROCESSOR_CONFIG).is_file():
            processor = AutoProcessor.from_pretrained(d, local_files_only=True)
            tok, proc = processor.tokenizer, processor.image_processor
        else:
            tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
            proc = AutoImageProcessor.from_pretrained(d, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{d}: cannot load the tokenizer / image processor ({exc})") from exc
    if not getattr(tok, "chat_template", None):
        tmpl = _chat_template_file(d)
        if tmpl:
            tok.chat_template = tmpl
    return tok, proc


# -- LoRA checkpoints in peft's own format ------------------------------------------------
FULL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
)


def _has_full_weights(d: pathlib.Path) -> bool:
    return (d / "config.json").is_file() and not (d / ADAPTER_CONFIG).is_file()


def save_base_copy(loaded: Any, base_dir: pathlib.Path) -> pathlib.Path:
    """The initial base model (LoRA and the trained projector copy left out) + tokenizer + image
    processor, saved with ``save_pretrained`` into ``base_dir`` once per loaded model."""
    if loaded.info.get("saved_base") == str(base_dir) and _has_full_weights(base_dir):
        return base_dir
    with atomic_dir(base_dir) as tmp:  # written whole or not at all
        save_full_weights(tmp, loaded.model, merged_state_dict(loaded.model, trained=False))
        save_processors(tmp, loaded)
        write_meta(tmp, loaded, weights="full", lora=None, extra={"role": "initial base model"})
    loaded.info["saved_base"] = str(base_dir)
    return base_dir


def base_reference(loaded: Any, base_dir: pathlib.Path) -> str:
    """What an adapter of ``loaded`` names as its base: the hub id, the local full-weights
    directory it was loaded from (absolute), else a base copy saved to ``base_dir``."""
    hub_id = loaded.info.get("hub_id")
    if hub_id:
        return str(hub_id)
    source = str(loaded.info.get("source", ""))
    if source and not source.startswith("preset:") and _has_full_weights(pathlib.Path(source)):
        return str(pathlib.Path(source).resolve())
    # a preset, or a model merged from an adapter checkpoint: its weights exist nowhere on disk
    return str(save_base_copy(loaded, base_dir).resolve())


def _remove_stale(d: pathlib.Path, names: tuple[str, ...]) -> None:
    """Drop files of the other checkpoint kind left in an aimkp checkpoint directory (a run
    resumed from a checkpoint of an older aimkp), so that what loads is what was saved."""
    if read_meta(d) is None:
        return
    for name in names:
        (d / name).unlink(missing_ok=True)


def save_adapter(d: pathlib.Path, model: PeftModel, base: str) -> None:
    """peft's ``save_pretrained`` with ``base_model_name_or_path = base`` (restored after)."""
    if pathlib.Path(base).is_dir() and pathlib.Path(base).resolve() == d.resolve():
        raise CheckpointError(f"{d}: is the adapter's own base model; save the adapter elsewhere")
    configs = model.peft_config.values()
    previous = [c.base_model_name_or_path for c in configs]
    for c in configs:
        c.base_model_name_or_path = base
    try:
        # no embedding layers are adapted; "auto" would look the base up on the Hub
        model.save_pretrained(str(d), safe_serialization=True, save_embedding_layers=False)
    finally:
        for c, p in zip(configs, previous):
            c.base_model_name_or_path = p
    _remove_stale(d, FULL_WEIGHT_FILES)


def remove_stale_adapter(d: pathlib.Path) -> None:
    """Before full weights are written: drop an adapter an older save left there."""
    _remove_stale(d, (ADAPTER_CONFIG, ADAPTER_WEIGHTS))


def adapter_base_name(d: pathlib.Path) -> str:
    """``base_model_name_or_path`` of the adapter checkpoint ``d``."""
    p = d / ADAPTER_CONFIG
    try:
        ref = json.loads(p.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(ref, str) or not ref:
        raise CheckpointError(f"{p}: no base_model_name_or_path: cannot tell which base to load")
    return ref


def resolve_base(ref: str, d: pathlib.Path) -> pathlib.Path:
    """The local directory of the base ``ref`` an adapter at ``d`` names.

    Tried in order: ``ref`` as a path, relative to ``d``, by its name inside or beside ``d``
    (a run directory moved since training: ``OUTPUT/best/base``, ``OUTPUT/base``), then a hub
    id in the local cache."""
    name = pathlib.Path(ref).name
    cands = [pathlib.Path(ref).expanduser(), d / ref, d / name, d.parent / name]
    for cand in cands:
        if _has_full_weights(cand):
            return cand
    if looks_like_hub_id(ref):
        return resolve_hub_id(ref)
    raise CheckpointError(
        f"{d}: the base model {ref!r} named in {ADAPTER_CONFIG} is neither a local model "
        "directory nor a hub id (also looked for it beside the checkpoint)"
    )


def load_adapter_checkpoint(
    d: pathlib.Path, *, dtype: torch.dtype | None = None, attn: str = "sdpa"
) -> tuple[nn.Module, Any, Any, str | None, dict[str, Any]]:
    """Load (model, tokenizer, image processor, preset, info) of an adapter checkpoint: its base,
    the adapter with peft's ``PeftModel.from_pretrained``, merged (``merge_and_unload``), so
    prediction runs a plain model as it does for full checkpoints."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise CheckpointError(f"{d}: a LoRA adapter checkpoint needs peft ({exc})") from exc
    base_dir = resolve_base(adapter_base_name(d), d)
    model, tok, proc, preset, _ = load_local(base_dir, dtype=dtype, attn=attn)
    model = PeftModel.from_pretrained(model, str(d), is_trainable=False).merge_and_unload()
    if (d / "tokenizer_config.json").is_file():
        tok, proc = load_processors(d)
    meta = read_meta(d)
    if meta and meta.get("preset"):
        preset = meta["preset"]
    return model, tok, proc, preset, {"source": str(d), "aimkp": meta, "base": str(base_dir)}
