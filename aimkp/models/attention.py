"""Varlen attention for packed rows, plugged into transformers' attention registry.

The compact rows of a step are packed into one ``[1, K]`` sequence; ``cu_seqlens`` (IntTensor
``[R+1]``) says where each row starts. With ``--attn varlen`` every language-model attention
layer computes causal attention *within* each row only, through, in order of preference:

- ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own FlashAttention-2 varlen kernel,
  torch >= 2.10, CUDA, fp16 / bf16 inputs): no flash-attn wheel needed;
- the CPU reference (:func:`varlen_reference`): one causal SDPA per row, exact, used on the CPU,
  for fp32 inputs, and where the torch kernel is missing.

(``--attn flash`` is transformers' own ``flash_attention_2`` path: flash-attn's
``flash_attn_varlen_func`` over the same ``cu_seq_lens``, where the package is installed.)

It is registered under :data:`VARLEN_IMPL` with ``transformers.AttentionInterface`` (the Hugging
Face model code runs unchanged: transformers forwards the ``cu_seq_lens_q/k`` and
``max_length_q/k`` keyword arguments of the language model's call to every attention layer,
exactly as for flash-attn). Calls without ``cu_seq_lens_q`` (generation, the vision tower) run
transformers' own SDPA function, and the mask is built as for SDPA (``sdpa_mask``), so decoding
a padded batch is unchanged.

:func:`last_kernel` names the kernel that ran last (``"torch varlen_attn"`` or
``"cpu reference"``) for the training log's backends line; :func:`kernel_name` adds flash-attn.

>>> name = resolve_attention("auto", torch.device("cuda"))   # "aimkp_varlen" where the kernel is
>>> apply_attention(model, name)                               # the text model only
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from aimkp.errors import UsageError

log = logging.getLogger(__name__)

VARLEN_IMPL = "aimkp_varlen"
# user-facing --attn names -> transformers attention implementation names
ATTN_CHOICES = ("auto", "sdpa", "varlen", "flash", "eager")
_HF_NAMES = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2", "varlen": VARLEN_IMPL}
TORCH_KERNEL = "torch varlen_attn"
REFERENCE_KERNEL = "cpu reference"

_last: dict[str, str] = {}


def last_kernel() -> str | None:
    """The varlen kernel of the last packed attention call (None before any)."""
    return _last.get("kernel")


def kernel_name(impl: str) -> str | None:
    """The varlen kernel behind attention implementation ``impl`` (None: not a varlen path)."""
    if impl == VARLEN_IMPL:
        return last_kernel() or "not run yet"
    if impl.startswith("flash_attention"):
        return "flash-attn"
    return None


def torch_varlen_attn() -> Callable[..., Any] | None:
    """``torch.nn.attention.varlen.varlen_attn`` where this torch has it (2.10+), else None.
    Typed loosely: its signature and return (``Tensor``, or a pair with ``return_aux``) differ
    across torch releases."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_available(device: torch.device | str) -> bool:
    """True when packed rows on ``device`` can run PyTorch's varlen FlashAttention kernel."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch_varlen_attn() is not None


def resolve_attention(attn: str, device: torch.device | str | None) -> str:
    """The transformers attention implementation for ``--attn attn`` on ``device``.

    ``auto``: :data:`VARLEN_IMPL` on CUDA where the torch kernel exists, else ``sdpa`` (so CPU
    runs keep the SDPA padded-row numbers). ``flash`` needs the flash-attn package.
    """
    if attn not in ATTN_CHOICES:
        raise UsageError(f"attn must be one of {list(ATTN_CHOICES)}, got {attn!r}")
    if attn == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return VARLEN_IMPL if varlen_available(dev) else "sdpa"
    if attn == "flash":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise UsageError("attn='flash' needs the flash-attn package (pip install aimkp[flash])")
    return _HF_NAMES[attn]


def apply_attention(model: torch.nn.Module, impl: str) -> None:
    """Set ``impl`` on ``model``; :data:`VARLEN_IMPL` goes to the text model only (the vision
    tower keeps SDPA: its sequences are not packed rows)."""
    set_attn_implementation = model.set_attn_implementation
    assert callable(set_attn_implementation)  # a transformers model's method
    if impl == VARLEN_IMPL:
        register()
        set_attn_implementation("sdpa")
        set_attn_implementation({"text_config": VARLEN_IMPL})
    else:
        set_attn_implementation(impl)


def varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float | None) -> Tensor:
    """Causal attention within each packed segment: q ``[K, Hq, D]``, k / v ``[K, Hkv, D]``
    (GQA: ``Hq`` a multiple of ``Hkv``), ``cu`` ``[R+1]`` -> ``[K, Hq, D]``.

    One SDPA call per segment; on the CPU the cost is ``sum_r K_r^2``, as on the GPU kernel."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            seg = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1),
                k[a:b].transpose(0, 1),
                v[a:b].transpose(0, 1),
                is_causal=True,
                scale=scale,
            )
            out[a:b] = seg.transpose(0, 1)
    return out


def _torch_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float | None
) -> Tensor:
    """``varlen_attn`` across its signatures: torch 2.10 takes ``is_causal=``; later releases
    ``window_size=(-1, 0)`` for causal, ``scale=`` and ``enable_gqa=`` (guarded by inspection)."""
    fn = torch_varlen_attn()
    assert fn is not None  # TORCH_KERNEL is only chosen where this torch has varlen_attn
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None:
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel applies 1 / sqrt(D)
    cu = cu.to(device=q.device, dtype=torch.int32)
    q, k, v = (t.contiguous() for t in (q, k, v))  # [K, H, D] from transposed [1, H, K, D]
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def pick_kernel(q: Tensor) -> str:
    """Kernel for packed ``q`` ``[K, H, D]``: the torch kernel on CUDA for fp16 / bf16 where it
    exists, else the reference (FlashAttention has no fp32 path)."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if q.is_cuda and half and torch_varlen_attn() is not None:
        return TORCH_KERNEL
    return REFERENCE_KERNEL


def packed_attention(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float | None, kernel: str
) -> Tensor:
    """Run ``kernel`` on packed q ``[K, Hq, D]``, k / v ``[K, Hkv, D]`` -> ``[K, Hq, D]``."""
    _last["kernel"] = kernel
    if kernel == TORCH_KERNEL:
        return _torch_varlen(q, k, v, cu, max_len, scale)
    return varlen_reference(q, k, v, cu, scale)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: query ``[1, Hq, K, D]``, key / value ``[1, Hkv, K, D]``
    -> (``[1, K, Hq, D]``, None). With ``cu_seq_lens_q`` (packed rows): causal within each row,
    the mask is ignored (rows never see each other); without: transformers' SDPA function."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"packed rows are one sequence: batch 1, got {query.shape[0]}")
    if dropout:
        raise ValueError("varlen attention runs without attention dropout (attention_dropout=0)")
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu_k is not None and not torch.equal(cu_k, cu):
        raise ValueError("varlen attention here is self-attention: cu_seq_lens_k == cu_seq_lens_q")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [K, H, D]
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # what SDPA does under autocast: an fp32 residual stream (fp32 base + --bf16) makes
        # RoPE's q / k fp32 even though the projections ran in the autocast dtype
        half = torch.get_autocast_dtype("cuda")
        q, k, v = (t.to(half) for t in (q, k, v))
    max_len = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
    out = packed_attention(q, k, v, cu, int(max_len), scaling, pick_kernel(q))
    return out.unsqueeze(0), None


def register() -> None:
    """Register :data:`VARLEN_IMPL` with transformers (idempotent): the attention function and,
    for its calls without packed rows, SDPA's mask construction."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_IMPL, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_IMPL, sdpa_mask)
