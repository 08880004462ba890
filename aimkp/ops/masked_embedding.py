"""Embedding lookup with fused token-level modality masking and vision-feature merge.

One op, top to bottom: argument checks, the source index (cheap ``[N]`` int work in torch), the
``torch.library`` custom ops ``aimkp::masked_embedding`` / ``aimkp::masked_embedding_backward``
with fake impls and registered autograd, the backends (Triton, C++ ``aimkp._C``, CUDA C++,
plain-PyTorch reference), the public function and the ``nn.Module``.

Every output row k has one source, ``src[k]``: a table row (``0 <= src < V``), an image-feature
row (``src = V + j``) or the fill row (``-1``: hidden or ``ignore_index`` positions). The kernels
are pure gathers over ``src``; the backward is a segment reduction over it (C++: atomic-free and
always deterministic; Triton / CUDA: fp32 atomics, or sorted segments with ``deterministic=True``).

torch.compile: the dense path is one graph (``fullgraph=True`` works): the fake impl gives
``[N, D]`` and the value checks (one host sync) run inside the op's real implementation, which
stays eager under compile. The compact path computes its index with ``nonzero`` outside the op:
dynamo breaks the graph there by default, or, with
``torch._dynamo.config.capture_dynamic_output_shape_ops = True``, treats K as an unbacked symbol
and compiles one graph (both tested in tests/ops/test_masked_embedding_torch.py).

Example::

    >>> import torch
    >>> from aimkp.ops import masked_embedding
    >>> w = torch.randn(10, 4)
    >>> ids = torch.tensor([[1, 9, 9, 3]])           # 9 = image token
    >>> keep = torch.tensor([[True, True, False, True]])
    >>> feats = torch.randn(2, 4)                    # one row per image token, hidden or not
    >>> out = masked_embedding(ids, w, keep, image_features=feats, image_token_id=9)
    >>> out.shape
    torch.Size([1, 4, 4])
    >>> c = masked_embedding(ids, w, keep, feats, 9, compact=True)
    >>> c.positions.tolist(), c.cu_seqlens.tolist()
    ([0, 1, 3], [0, 3])
"""

from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple, overload

import torch
from torch import Tensor, nn

from aimkp._ext import DTYPE_CODES, dtype_code, ext_available, has_cuda_kernels, load_ext
from aimkp.ops._registry import record_backend
from aimkp.ops.masked_embedding_ref import (
    CompactEmbedding,
    compaction_index,
    masked_embedding_reference,
)

__all__ = [
    "CompactEmbedding",
    "MaskedEmbedding",
    "masked_embedding",
    "masked_embedding_reference",
    "replace_input_embedding",
]

OP = "masked_embedding"
BACKENDS = ("auto", "triton", "cpp", "cuda", "reference")
_KERNEL_BACKENDS = ("triton", "cpp", "cuda")


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def _check_args(
    input_ids: Any,
    weight: Any,
    keep: Any,
    image_features: Any,
    image_token_id: Any,
    fill: Any,
    ignore_index: Any,
    backend: Any,
) -> None:
    """Shape / dtype / device checks (metadata only: no synchronisation, traceable)."""
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be [N] or [B, T], got shape {tuple(input_ids.shape)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a [V, D] tensor, got {shape}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    dev = weight.device
    if input_ids.device != dev:
        raise ValueError(f"input_ids is on {input_ids.device} but weight is on {dev}")
    d = weight.shape[1]
    if keep is not None:
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
            got = keep.dtype if isinstance(keep, Tensor) else type(keep).__name__
            raise ValueError(f"keep must be a bool tensor, got {got}")
        if keep.shape != input_ids.shape:
            raise ValueError(
                f"keep has shape {tuple(keep.shape)} but input_ids has {tuple(input_ids.shape)}"
            )
        if keep.device != dev:
            raise ValueError(f"keep is on {keep.device} but weight is on {dev}")
    if image_features is not None:
        if not isinstance(image_features, Tensor) or image_features.dim() != 2:
            raise ValueError("image_features must be a [M, D] tensor")
        if image_features.shape[1] != d:
            raise ValueError(
                f"image_features has width {image_features.shape[1]} but weight has D={d}"
            )
        if image_features.dtype != weight.dtype:
            raise ValueError(
                f"image_features dtype {image_features.dtype} differs from weight dtype "
                f"{weight.dtype}"
            )
        if image_features.device != dev:
            raise ValueError(f"image_features is on {image_features.device} but weight on {dev}")
        if image_token_id is None:
            raise ValueError("image_features given without image_token_id")
    if image_token_id is not None and not isinstance(image_token_id, int):
        raise ValueError(f"image_token_id must be an int, got {type(image_token_id).__name__}")
    if ignore_index is not None and not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if image_token_id is not None and image_token_id == ignore_index:
        raise ValueError(f"image_token_id and ignore_index are both {image_token_id}")
    if fill is not None:
        if not isinstance(fill, Tensor) or tuple(fill.shape) != (d,):
            shape = tuple(fill.shape) if isinstance(fill, Tensor) else type(fill).__name__
            raise ValueError(f"fill must be a [D]=[{d}] tensor, got {shape}")
        if fill.dtype != weight.dtype:
            raise ValueError(f"fill dtype {fill.dtype} differs from weight dtype {weight.dtype}")
        if fill.device != dev:
            raise ValueError(f"fill is on {fill.device} but weight is on {dev}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_values(
    ids: Tensor,
    num_rows: int,
    num_image_rows: int,
    image_token_id: int | None,
    ignore_index: int | None,
) -> None:
    """Id range and image-token count (one reduction, one host sync). ``ids`` is flat."""
    n = ids.numel()
    is_img = ids == image_token_id if image_token_id is not None else None
    if n == 0:
        if num_image_rows:
            raise ValueError(
                f"image_features has {num_image_rows} rows but input_ids holds 0 image tokens"
            )
        return
    special = (
        ids == ignore_index if ignore_index is not None else torch.zeros_like(ids, dtype=torch.bool)
    )
    if is_img is not None:
        special = special | is_img
    text = torch.where(special, 0, ids)
    mn, mx = torch.aminmax(text)
    n_img = is_img.sum() if is_img is not None else torch.zeros((), dtype=torch.int64)
    lo, hi, cnt = torch.stack([mn, mx, n_img.to(mn.device)]).tolist()
    if lo < 0 or hi >= num_rows:
        bad = int(torch.nonzero((text < 0) | (text >= num_rows))[0, 0])
        allowed = []
        if ignore_index is not None:
            allowed.append(f"ignore_index={ignore_index}")
        if image_token_id is not None:
            allowed.append(f"image_token_id={image_token_id}")
        extra = f" (only {' and '.join(allowed)} may lie outside)" if allowed else ""
        raise ValueError(
            f"input_ids: id {int(ids[bad])} at flat index {bad} is outside [0, {num_rows}) "
            f"(weight has {num_rows} rows){extra}"
        )
    if cnt != num_image_rows:
        which = "fewer" if num_image_rows < cnt else "more"
        raise ValueError(
            f"image_features: {num_image_rows} rows given but input_ids holds {cnt} image tokens "
            f"(image_token_id={image_token_id}): {which} features than image tokens; every "
            "image token takes exactly one row, in order"
        )


def _source_rows(
    ids: Tensor,
    keep: Tensor | None,
    index: Tensor | None,
    num_rows: int,
    image_token_id: int | None,
    ignore_index: int | None,
) -> Tensor:
    """``src [K]`` int64: table row, ``V + image row`` or ``-1`` (fill) for every output row."""
    src = ids.to(torch.int64)
    is_img = None
    if image_token_id is not None:
        is_img = ids == image_token_id
        rank = torch.cumsum(is_img, 0) - 1  # image rows consumed in flat order, hidden or not
        src = torch.where(is_img, rank + num_rows, src)
    if ignore_index is not None:
        ign = ids == ignore_index
        if is_img is not None:
            ign = ign & ~is_img
        src = torch.where(ign, -1, src)
    if keep is not None:
        src = torch.where(keep, src, -1)
    if index is not None:
        src = src[index]
    return src.contiguous()


def _stream_of(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _empty(*shape: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """Uninitialised buffer a kernel must fully write (tests poison it with NaN through this)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@overload
def _row_major(t: Tensor) -> Tensor: ...
@overload
def _row_major(t: None) -> None: ...
@overload
def _row_major(t: Tensor | None) -> Tensor | None: ...
def _row_major(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _ptr(t: Tensor | None) -> int:
    """Raw data pointer for aimkp._C (0 for an absent optional tensor)."""
    return t.data_ptr() if t is not None else 0


# ----------------------------------------------------------------------------------------------
# Prepared launch arguments
# ----------------------------------------------------------------------------------------------
class ForwardLaunch(NamedTuple):
    """One forward gather, ready for any backend: ``out [K, D]`` (uninitialised, fully written
    by the kernel), ``src [K]`` int64 source rows, ``weight [V, D]`` / ``image [M, D]`` with unit
    column stride, ``fill [D]`` contiguous (image / fill None when absent). The field names are
    the Triton launcher's keywords."""

    out: Tensor
    src: Tensor
    weight: Tensor
    image: Tensor | None
    fill: Tensor | None

    @classmethod
    def prepare(
        cls, src: Tensor, weight: Tensor, image: Tensor | None, fill: Tensor | None
    ) -> ForwardLaunch:
        weight = _row_major(weight)
        out = _empty(src.numel(), weight.shape[1], dtype=weight.dtype, device=weight.device)
        fill = fill.contiguous() if fill is not None else None
        return cls(out, src, weight, _row_major(image), fill)

    def ext_kwargs(self) -> dict[str, int]:
        """Keyword arguments of aimkp._C's ``masked_embedding_forward_*`` entry points."""
        (k, d), img = self.out.shape, self.image
        return dict(
            out=self.out.data_ptr(), src=self.src.data_ptr(), K=k, D=d,
            weight=self.weight.data_ptr(), V=self.weight.shape[0],
            weight_stride=self.weight.stride(0), image=_ptr(img),
            M=img.shape[0] if img is not None else 0,
            image_stride=img.stride(0) if img is not None else 0, fill=_ptr(self.fill),
            dtype=dtype_code(self.weight.dtype),
        )  # fmt: skip


class BackwardLaunch(NamedTuple):
    """One backward segment reduction: ``grad [K, D]`` contiguous, ``src [K]`` int64, the table
    and image sizes, which gradients are needed, and ``deterministic``."""

    grad: Tensor
    src: Tensor
    num_rows: int
    num_image_rows: int
    need_weight: bool
    need_image: bool
    need_fill: bool
    deterministic: bool

    def zeros(self, rows: int, need: bool, dtype: torch.dtype | None = None) -> Tensor | None:
        """A zero ``[rows, D]`` gradient buffer (``grad``'s dtype by default), or None."""
        if not need:
            return None
        return self.grad.new_zeros(rows, self.grad.shape[1], dtype=dtype or self.grad.dtype)

    def fill_buffer(self) -> Tensor | None:
        """The fill gradient's fp32 ``[D]`` accumulator, or None."""
        return (
            self.grad.new_zeros(self.grad.shape[1], dtype=torch.float32) if self.need_fill else None
        )


class Segments(NamedTuple):
    """``src`` sorted (stable) and cut into runs of equal ids: ``sorted_src [K]``, ``perm [K]``
    (original index of each sorted entry), ``starts [S + 1]`` int64 run offsets, ``count`` S."""

    sorted_src: Tensor
    perm: Tensor
    starts: Tensor
    count: int  # type: ignore[assignment]  # the field deliberately shadows tuple.count


def sorted_segments(src: Tensor) -> Segments:
    """The deterministic backward's segments of ``src [K]`` (K > 0): one sort, one
    ``unique_consecutive``, one cumsum."""
    sorted_src, perm = torch.sort(src, stable=True)
    _, counts = torch.unique_consecutive(sorted_src, return_counts=True)
    starts = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=src.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return Segments(sorted_src, perm, starts, counts.numel())


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


def _forward_cpp(launch: ForwardLaunch) -> Tensor:
    # the C++ kernels follow torch's intra-op thread setting
    load_ext().masked_embedding_forward_cpu(**launch.ext_kwargs(), threads=torch.get_num_threads())
    return launch.out


def _forward_cuda(launch: ForwardLaunch) -> Tensor:
    load_ext().masked_embedding_forward_cuda(
        **launch.ext_kwargs(), stream=_stream_of(launch.weight)
    )
    return launch.out


def _forward_triton(launch: ForwardLaunch) -> Tensor:
    from aimkp.kernels.masked_embedding import masked_embedding_forward

    return masked_embedding_forward(**launch._asdict())


def _backward_cpp(req: BackwardLaunch) -> Grads:
    # always deterministic (atomic-free segment sums): req.deterministic changes nothing
    k, d = req.grad.shape
    sorted_src, perm = torch.sort(req.src, stable=True)
    gw = _empty(req.num_rows, d, dtype=req.grad.dtype) if req.need_weight else None
    gi = _empty(req.num_image_rows, d, dtype=req.grad.dtype) if req.need_image else None
    gf = req.fill_buffer()
    load_ext().masked_embedding_backward_cpu(
        grad=req.grad.data_ptr(), K=k, D=d, sorted_src=sorted_src.data_ptr(),
        perm=perm.data_ptr(), grad_weight=_ptr(gw), V=req.num_rows, grad_image=_ptr(gi),
        M=req.num_image_rows, grad_fill=_ptr(gf), dtype=dtype_code(req.grad.dtype),
        threads=torch.get_num_threads(),
    )  # fmt: skip
    return gw, gi, gf


def _backward_cuda(req: BackwardLaunch) -> Grads:
    ext, (k, d) = load_ext(), req.grad.shape
    gi, gf = req.zeros(req.num_image_rows, req.need_image), req.fill_buffer()
    common = dict(
        grad=req.grad.data_ptr(), D=d, V=req.num_rows, grad_image=_ptr(gi),
        M=req.num_image_rows, grad_fill32=_ptr(gf), dtype=dtype_code(req.grad.dtype),
        stream=_stream_of(req.grad),
    )  # fmt: skip
    if req.deterministic:
        gw = req.zeros(req.num_rows, req.need_weight)
        if k:
            seg = sorted_segments(req.src)
            ext.masked_embedding_backward_segments_cuda(
                **common, sorted_src=seg.sorted_src.data_ptr(), perm=seg.perm.data_ptr(),
                seg_start=seg.starts.data_ptr(), S=seg.count, grad_weight=_ptr(gw),
            )  # fmt: skip
        return gw, gi, gf
    gw32 = req.zeros(req.num_rows, req.need_weight, torch.float32)
    ext.masked_embedding_backward_atomic_cuda(
        **common, src=req.src.data_ptr(), K=k, grad_weight32=_ptr(gw32)
    )
    return (gw32.to(req.grad.dtype) if gw32 is not None else None), gi, gf


def _backward_triton(req: BackwardLaunch) -> Grads:
    from aimkp.kernels.masked_embedding import masked_embedding_backward

    k, d = req.grad.shape
    segments = sorted_segments(req.src) if req.deterministic and k and d else None
    gw_dtype = req.grad.dtype if req.deterministic else torch.float32
    gw = req.zeros(req.num_rows, req.need_weight, gw_dtype)
    gi, gf = req.zeros(req.num_image_rows, req.need_image), req.fill_buffer()
    masked_embedding_backward(
        grad=req.grad, src=req.src, segments=segments, grad_weight=gw, grad_image=gi,
        grad_fill=gf, num_rows=req.num_rows, num_image_rows=req.num_image_rows,
    )  # fmt: skip
    return (gw.to(req.grad.dtype) if gw is not None else None), gi, gf


_FORWARD = {"cpp": _forward_cpp, "cuda": _forward_cuda, "triton": _forward_triton}
_BACKWARD = {"cpp": _backward_cpp, "cuda": _backward_cuda, "triton": _backward_triton}


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (called with keywords; the schemas' argument names are the keys)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("aimkp::masked_embedding", mutates_args=())
def _masked_embedding_op(
    ids: Tensor,
    keep: Tensor | None,
    index: Tensor | None,
    weight: Tensor,
    image_features: Tensor | None,
    fill: Tensor | None,
    image_token_id: int | None,
    ignore_index: int | None,
    deterministic: bool,
    backend: str,
) -> Tensor:
    """Rows ``[K, D]`` (K = N, or len(index)); ids/keep flat ``[N]``; see module docstring.
    ``deterministic`` is used by the backward only."""
    v = weight.shape[0]
    m = image_features.shape[0] if image_features is not None else 0
    _check_values(ids, v, m, image_token_id, ignore_index)
    src = _source_rows(ids, keep, index, v, image_token_id, ignore_index)
    out = _FORWARD[backend](ForwardLaunch.prepare(src, weight, image_features, fill))
    record_backend(OP, backend)
    return out


@_masked_embedding_op.register_fake
def _(ids: Tensor, keep: Tensor | None, index: Tensor | None, weight: Tensor, *_: Any) -> Tensor:
    k = index.shape[0] if index is not None else ids.shape[0]
    return weight.new_empty(k, weight.shape[1])


#: the forward op's argument names, in schema order (autograd wants one gradient per input)
_OP_INPUTS = tuple(a.name for a in torch.ops.aimkp.masked_embedding.default._schema.arguments)
#: forward inputs that get a gradient -> the backward op's flag asking for it
_DIFFERENTIABLE = {"weight": "need_weight", "image_features": "need_image", "fill": "need_fill"}


@torch.library.custom_op("aimkp::masked_embedding_backward", mutates_args=())
def _masked_embedding_backward_op(
    grad: Tensor,
    ids: Tensor,
    keep: Tensor | None,
    index: Tensor | None,
    num_rows: int,
    num_image_rows: int,
    image_token_id: int | None,
    ignore_index: int | None,
    need_weight: bool,
    need_image: bool,
    need_fill: bool,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_weight [V, D] | [0, D], grad_image [M, D] | [0, D], grad_fill [D] | [0])``."""
    d = grad.shape[1]
    src = _source_rows(ids, keep, index, num_rows, image_token_id, ignore_index)
    gw, gi, gf = _BACKWARD[backend](
        BackwardLaunch(
            grad=grad.contiguous(), src=src, num_rows=num_rows, num_image_rows=num_image_rows,
            need_weight=need_weight, need_image=need_image, need_fill=need_fill,
            deterministic=deterministic,
        )
    )  # fmt: skip
    empty = grad.new_zeros(0, d)
    return (
        gw if gw is not None else empty,
        gi if gi is not None else empty.clone(),
        gf.to(grad.dtype) if gf is not None else grad.new_zeros(0),
    )


@_masked_embedding_backward_op.register_fake
def _(grad, ids, keep, index, v, m, image_token_id, ignore_index, nw, ni, nf, det, backend):
    d = grad.shape[1]
    return (
        grad.new_empty(v if nw else 0, d),
        grad.new_empty(m if ni else 0, d),
        grad.new_empty(d if nf else 0),
    )


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    args = dict(zip(_OP_INPUTS, inputs))
    ctx.save_for_backward(args["ids"], args["keep"], args["index"])
    image = args["image_features"]
    ctx.options = dict(
        num_rows=args["weight"].shape[0],
        num_image_rows=image.shape[0] if image is not None else 0,
        image_token_id=args["image_token_id"],
        ignore_index=args["ignore_index"],
        deterministic=args["deterministic"],
        backend=args["backend"],
    )


def _backward(ctx: Any, grad: Tensor) -> tuple:
    ids, keep, index = ctx.saved_tensors
    needs = dict(zip(_OP_INPUTS, ctx.needs_input_grad))
    flags = {flag: needs[name] for name, flag in _DIFFERENTIABLE.items()}
    got = torch.ops.aimkp.masked_embedding_backward(
        grad=grad, ids=ids, keep=keep, index=index, **ctx.options, **flags
    )
    grads = {name: g for name, g in zip(_DIFFERENTIABLE, got) if needs[name]}
    return tuple(grads.get(name) for name in _OP_INPUTS)


torch.library.register_autograd("aimkp::masked_embedding", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
_warned_fallback: set[str] = set()


def _resolve_backend(backend: str, weight: Tensor) -> str:
    dev = weight.device.type
    kernel_dtype = weight.dtype in DTYPE_CODES
    if backend == "auto":
        if not kernel_dtype:
            return "reference"
        if dev == "cuda":
            try:
                import triton  # noqa: F401

                return "triton"
            except ImportError:
                chosen = "cuda" if has_cuda_kernels() else "reference"
        elif dev == "cpu":
            chosen = "cpp" if ext_available() else "reference"
        else:
            chosen = "reference"
        if chosen == "reference" and dev not in _warned_fallback:
            _warned_fallback.add(dev)
            warnings.warn(
                f"aimkp.ops.masked_embedding: no kernel for {dev} tensors here "
                "(aimkp._C or triton missing); using the PyTorch reference",
                stacklevel=3,
            )
        return chosen
    if backend in _KERNEL_BACKENDS and not kernel_dtype:
        raise ValueError(
            f"backend={backend!r} supports float32/float16/bfloat16 weights, got {weight.dtype}"
        )
    if backend == "cpp":
        if dev != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got {dev} (use 'cuda'/'triton')")
        load_ext()
    elif backend == "cuda":
        if dev != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {dev}")
        if not has_cuda_kernels():
            raise ValueError("backend='cuda': aimkp._C was built without CUDA kernels (no nvcc)")
    elif backend == "triton":
        if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                "imported (the interpreter); use backend='cpp' for fast CPU execution"
            )
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' needs CUDA (or interpreted CPU) tensors, got {dev}")
    return backend


def masked_embedding(
    input_ids: Tensor,
    weight: Tensor,
    keep: Tensor | None = None,
    image_features: Tensor | None = None,
    image_token_id: int | None = None,
    fill: Tensor | None = None,
    ignore_index: int | None = None,
    compact: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
) -> Tensor | CompactEmbedding:
    """Embedding lookup with token-level modality masking and the vision-feature merge fused in.

    Args:
        input_ids: LongTensor ``[N]`` or ``[B, T]`` (int32 accepted).
        weight: table ``[V, D]`` (float32 / float16 / bfloat16 for the kernels).
        keep: bool ``[N]`` / ``[B, T]``; False hides the token (output ``fill``). None: all kept.
        image_features: ``[M, D]``; the k-th position (flat order) whose id is ``image_token_id``
            takes row k. Hidden image tokens consume their row too. M must equal the number of
            image tokens exactly.
        image_token_id: id of the image placeholder (may lie outside ``[0, V)``).
        fill: learnable ``[D]`` row for hidden / ignored positions (zeros when None).
        ignore_index: ids equal to it (e.g. -100 padding) read no table row and output ``fill``.
        compact: return only the kept rows, packed, as a :class:`CompactEmbedding`
            (values ``[K, D]``, positions ``[K]``, cu_seqlens ``[B+1]`` int32, index ``[K]``).
        deterministic: Triton / CUDA backward by sorted segment sums instead of fp32 atomics
            (the C++ backward is always deterministic).
        backend: ``"auto"`` (Triton for CUDA tensors, C++ for CPU), ``"triton"``, ``"cpp"``,
            ``"cuda"`` or ``"reference"``. The one that ran: ``aimkp.ops.last_backend(
            "masked_embedding")``, also logged at DEBUG level.

    Returns:
        ``[*input_ids.shape, D]`` in ``weight.dtype``, or a :class:`CompactEmbedding`.

    Raises:
        ValueError: ids outside ``[0, V)`` (other than ``ignore_index`` / ``image_token_id``),
            image-feature count different from the image-token count, shape / dtype / device
            mismatches, unknown or unavailable backend.
    """
    _check_args(
        input_ids, weight, keep, image_features, image_token_id, fill, ignore_index, backend
    )
    chosen = _resolve_backend(backend, weight)
    if input_ids.dtype != torch.int64:
        input_ids = input_ids.long()
    if chosen == "reference":
        m = image_features.shape[0] if image_features is not None else 0
        _check_values(input_ids.reshape(-1), weight.shape[0], m, image_token_id, ignore_index)
        out = masked_embedding_reference(
            input_ids, weight, keep=keep, image_features=image_features,
            image_token_id=image_token_id, fill=fill, ignore_index=ignore_index, compact=compact,
        )  # fmt: skip
        record_backend(OP, "reference")
        return out
    op_args = dict(
        ids=input_ids.reshape(-1), weight=weight, image_features=image_features, fill=fill,
        image_token_id=image_token_id, ignore_index=ignore_index, deterministic=deterministic,
        backend=chosen,
    )  # fmt: skip
    if not compact:
        flat_keep = keep.reshape(-1) if keep is not None else None
        out = torch.ops.aimkp.masked_embedding(keep=flat_keep, index=None, **op_args)
        return out.reshape(*input_ids.shape, weight.shape[1])
    # Compact: the data-dependent index is computed here, outside the custom op.
    index, positions, cu_seqlens = compaction_index(input_ids, keep)
    values = torch.ops.aimkp.masked_embedding(keep=None, index=index, **op_args)
    return CompactEmbedding(values, positions, cu_seqlens, index)


# ----------------------------------------------------------------------------------------------
# nn.Module
# ----------------------------------------------------------------------------------------------
class MaskedEmbedding(nn.Module):
    """Drop-in input embedding with modality masking: ``forward(input_ids, keep=None, ...)``.

    With only ``input_ids`` it is an exact ``nn.Embedding`` lookup (same weight, same output), so it
    can replace a Hugging Face model's input embedding in place (:func:`replace_input_embedding`).
    ``padding_idx`` keeps nn.Embedding's meaning: that row receives no gradient.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        image_token_id: int | None = None,
        ignore_index: int | None = None,
        learnable_fill: bool = False,
        deterministic: bool = False,
        backend: str = "auto",
        weight: nn.Parameter | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx
        self.image_token_id, self.ignore_index = image_token_id, ignore_index
        self.deterministic, self.backend = deterministic, backend
        if weight is None:
            weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim, device=device,
                                              dtype=dtype))  # fmt: skip
        elif tuple(weight.shape) != (num_embeddings, embedding_dim):
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}, expected "
                f"({num_embeddings}, {embedding_dim})"
            )
        self.weight = weight
        if learnable_fill:
            self.fill = nn.Parameter(weight.new_zeros(embedding_dim).detach())
        else:
            self.register_parameter("fill", None)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, **kwargs: Any) -> MaskedEmbedding:
        """A MaskedEmbedding sharing ``emb.weight`` (the same Parameter object)."""
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"emb must be an nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None or emb.sparse or emb.scale_grad_by_freq:
            raise ValueError("emb uses max_norm / sparse / scale_grad_by_freq: not supported")
        return cls(
            emb.num_embeddings,
            emb.embedding_dim,
            emb.padding_idx,
            # nn.Embedding.weight is a Parameter; torch's stub types it as a Tensor
            weight=emb.weight,  # type: ignore[arg-type]
            **kwargs,
        )

    def forward(
        self,
        input_ids: Tensor,
        keep: Tensor | None = None,
        image_features: Tensor | None = None,
        compact: bool = False,
    ) -> Tensor | CompactEmbedding:
        """``[*input_ids.shape, D]`` or a :class:`CompactEmbedding` (see masked_embedding)."""
        out = masked_embedding(
            input_ids,
            self.weight,
            keep=keep,
            image_features=image_features,
            # Without features the image token is an ordinary id (how HF LLaVA calls it).
            image_token_id=self.image_token_id if image_features is not None else None,
            fill=self.fill,
            ignore_index=self.ignore_index,
            compact=compact,
            deterministic=self.deterministic,
            backend=self.backend,
        )
        if self.padding_idx is None or not (torch.is_grad_enabled() and self.weight.requires_grad):
            return out
        # nn.Embedding semantics: the padding row gets no gradient from kept padding positions.
        pad = input_ids == self.padding_idx
        if keep is not None:
            pad = pad & keep
        if isinstance(out, CompactEmbedding):
            pad_rows = pad.reshape(-1)[out.index][:, None]
            return out._replace(values=torch.where(pad_rows, out.values.detach(), out.values))
        return torch.where(pad[..., None], out.detach(), out)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"image_token_id={self.image_token_id}, backend={self.backend!r}"
        )


def replace_input_embedding(model: nn.Module, **kwargs: Any) -> MaskedEmbedding:
    """Swap ``model.get_input_embeddings()`` for a :class:`MaskedEmbedding` sharing its weight."""
    get_input_embeddings = model.get_input_embeddings
    assert callable(get_input_embeddings)  # a transformers model's method
    emb = get_input_embeddings()
    if isinstance(emb, MaskedEmbedding):
        return emb
    new = MaskedEmbedding.from_embedding(emb, **kwargs)
    set_input_embeddings = model.set_input_embeddings
    assert callable(set_input_embeddings)  # a transformers model's method
    set_input_embeddings(new)
    return new
