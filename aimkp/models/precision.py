"""Memory of the frozen base at 7B scale: its dtype (``--dtype``) and activation checkpointing.

A LoRA run trains a few hundred MB of adapter + projector weights next to a frozen base of
7B parameters: kept in fp32 that base alone is 28 GB. :func:`cast_frozen_base` casts every
FROZEN floating-point parameter to the half dtype (14 GB in bf16) and leaves the trainable ones
(LoRA factors, projector, anything with ``requires_grad``) and therefore the optimizer state in
fp32; the row forward then runs under autocast (:func:`autocast_dtype`), the per-sample gradient
engine accumulates its norms / dots in fp32 as always. Buffers (rotary ``inv_freq``) stay as
they are.

:func:`enable_gradient_checkpointing` switches on the model's own non-reentrant checkpointing
(transformers' ``gradient_checkpointing_enable``): decoder layers keep only their inputs and
recompute the rest in the backward. The engine ignores the forwards re-run inside the backward
(``aimkp.engine.gram``), so per-row norms and the reweight are those of the first forward.
"""

from __future__ import annotations

from typing import Any

import torch

from aimkp.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.bfloat16, torch.float16)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``--dtype`` -> the frozen base's dtype: ``auto`` is bfloat16 on CUDA, float32 elsewhere.

    A half dtype needs CUDA: the row forward mixes fp32 trainable and half frozen weights under
    CUDA autocast (on the CPU the training step runs no autocast)."""
    device = torch.device(device)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"dtype must be one of {['auto', *DTYPES]}, got {name!r}")
    dtype = DTYPES[name]
    if dtype in HALF and device.type != "cuda":
        raise UsageError(f"--dtype {name} needs a CUDA device (autocast); use float32 on the CPU")
    return dtype


def autocast_dtype(base: torch.dtype, bf16: bool) -> torch.dtype | None:
    """The training step's autocast dtype (``StepOptions.amp_dtype``): the base's half dtype,
    else bfloat16 with ``--bf16``, else None (no autocast)."""
    if base in HALF:
        return base
    return torch.bfloat16 if bf16 else None


def cast_frozen_base(loaded: Any, dtype: torch.dtype) -> int:
    """Cast every frozen floating-point parameter of ``loaded.model`` to ``dtype``, in place
    (call it after LoRA is applied, so that ``requires_grad`` says what trains).

    Trainable parameters (and so their gradients and AdamW moments) are never touched. Returns
    the number of parameters cast."""
    n = 0
    for p in loaded.model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += p.numel()
    return n


def enable_gradient_checkpointing(loaded: Any) -> None:
    """Non-reentrant activation checkpointing through the model's own switch.

    Non-reentrant: reentrant checkpointing runs the first forward without grad, so the engine
    would see no call of the hooked layers (it reports that as an error)."""
    model = loaded.model
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x: the new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 5.17 (the GPU machine)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
