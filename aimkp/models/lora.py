"""LoRA set-up as in AimKP: every nn.Linear of the language model except lm_head.

The vision tower stays frozen; the multimodal projector is trained (``train_projector``) as peft's
``modules_to_save`` (a trainable copy beside the frozen original), so ``PeftModel.save_pretrained``
writes it into the adapter and ``merge_and_unload`` puts it back. ``full=True`` trains the whole
language model (with lm_head) and the projector instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from torch import nn

from aimkp.models.adapter import unwrap_model
from aimkp.models.registry import get_adapter

if TYPE_CHECKING:
    from aimkp.models import LoadedModel


def language_linear_names(model: nn.Module) -> list[str]:
    """Full module names of every nn.Linear in the language model (lm_head excluded)."""
    base = unwrap_model(model)
    lm = get_adapter(base).language_model
    lm_prefix = next(n for n, m in base.named_modules() if m is lm)
    return [
        f"{lm_prefix}.{n}"
        for n, m in lm.named_modules()
        if isinstance(m, nn.Linear) and n  # the decoder stack has no lm_head inside
    ]


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The full name of ``module`` inside ``model`` (ValueError when it is not a submodule)."""
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def apply_lora(
    target: nn.Module | LoadedModel,
    r: int = 128,
    alpha: int = 256,
    dropout: float = 0.05,
    train_projector: bool = True,
    full: bool = False,
    init_lora_weights: bool | str = True,
) -> nn.Module:
    """Make ``target`` (a model or a :class:`aimkp.models.LoadedModel`) trainable as AimKP does.

    LoRA (peft) on every nn.Linear of the language model except lm_head; vision tower frozen;
    projector trainable when ``train_projector``. ``full=True``: no LoRA, the language model
    (embeddings, decoder, lm_head) and the projector are trained. Returns the model to train
    (the peft wrapper with LoRA); a LoadedModel is updated in place.
    """
    # duck-typed: anything with .adapter and .set_model is handled as a LoadedModel
    loaded = (
        cast("LoadedModel", target)
        if hasattr(target, "adapter") and hasattr(target, "set_model")
        else None
    )
    model = loaded.model if loaded is not None else target
    if not isinstance(model, nn.Module):
        raise ValueError(f"apply_lora expects a model or LoadedModel, got {type(target).__name__}")
    if r <= 0 and not full:
        raise ValueError(f"LoRA rank must be positive, got r={r}")
    if hasattr(model, "peft_config"):
        raise ValueError("apply_lora: the model already has LoRA adapters (apply it once)")
    base = unwrap_model(model)
    adapter = get_adapter(base)
    for p in base.parameters():
        p.requires_grad_(False)
    if full:
        for p in adapter.language_model.parameters():
            p.requires_grad_(True)
        for p in adapter.lm_head.parameters():
            p.requires_grad_(True)
        for p in adapter.projector.parameters():
            p.requires_grad_(True)
        out = model
    else:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=language_linear_names(base),
            bias="none",
            # peft's Literal lacks the "pissa_niter_<n>" strings it accepts
            init_lora_weights=init_lora_weights,  # type: ignore[arg-type]
            modules_to_save=[module_name(base, adapter.projector)] if train_projector else None,
        )
        out = get_peft_model(base, cfg)
    if loaded is not None:
        loaded.set_model(out)
    return out
