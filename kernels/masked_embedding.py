"""Triton kernels of :func:`aimkp.ops.masked_embedding` and their launchers.

All kernels work on a precomputed source index ``src [K]`` (int64), one entry per output row:
``0 <= src < V`` reads table row ``src``, ``V <= src < V + M`` reads image-feature row ``src - V``,
anything else (``-1``) takes the fill row (zeros when there is none). The index has been validated
in torch before any launch, and every load is masked besides, so no kernel reads out of bounds.

- forward: a 2-D tiled gather ``out[K, D]`` (row x column tiles), an exact copy in the table
  dtype.
- backward, fast: fp32 atomics into ``grad_weight32 [V, D]``; the fill gradient is reduced inside
  the tile first (one atomic per column per program); image rows are unique, plain stores.
- backward, deterministic: the caller sorts ``src`` (stable) and cuts it into segments of equal ids;
  one program per (segment, column block) sums its rows in a fixed order, no atomics.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests; small grids only).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _row_tile(src_ptr, K, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's ``(BLOCK_R x BLOCK_D)`` tile of output rows / columns: the offsets, their
    masks and the rows' sources (-1 past the end)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < K
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    src = tl.load(src_ptr + rows, mask=rmask, other=-1)
    return rows, cols, rmask, cmask, m2, src


@triton.jit
def _masked_embedding_forward_kernel(
    out_ptr,
    src_ptr,
    w_ptr,
    img_ptr,
    fill_ptr,
    K,
    D,
    V,
    M,
    w_stride,
    img_stride,
    HAS_IMG: tl.constexpr,
    HAS_FILL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, rmask, cmask, m2, src = _row_tile(src_ptr, K, D, BLOCK_R, BLOCK_D)
    is_w = (src >= 0) & (src < V)
    w_row = tl.where(is_w, src, 0).to(tl.int64)
    val = tl.load(
        w_ptr + w_row[:, None] * w_stride + cols[None, :], mask=m2 & is_w[:, None], other=0.0
    )
    is_fill = ~is_w
    if HAS_IMG:
        is_i = (src >= V) & (src < V + M)
        i_row = tl.where(is_i, src - V, 0).to(tl.int64)
        v_img = tl.load(
            img_ptr + i_row[:, None] * img_stride + cols[None, :],
            mask=m2 & is_i[:, None],
            other=0.0,
        )
        val = tl.where(is_i[:, None], v_img, val)
        is_fill = is_fill & ~is_i
    if HAS_FILL:
        f = tl.load(fill_ptr + cols, mask=cmask, other=0.0)
        val = tl.where(is_fill[:, None], f[None, :], val)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], val, mask=m2)


@triton.jit
def _masked_embedding_backward_atomic_kernel(
    grad_ptr, src_ptr, gw_ptr, gi_ptr, gf_ptr, K, D, V, M,
    HAS_W: tl.constexpr, HAS_I: tl.constexpr, HAS_F: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows, cols, rmask, cmask, m2, src = _row_tile(src_ptr, K, D, BLOCK_R, BLOCK_D)
    g_raw = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=m2, other=0.0)
    g = g_raw.to(tl.float32)
    if HAS_W:
        is_w = (src >= 0) & (src < V)
        w_row = tl.where(is_w, src, 0).to(tl.int64)
        tl.atomic_add(gw_ptr + w_row[:, None] * D + cols[None, :], g, mask=m2 & is_w[:, None])
    if HAS_I:
        is_i = (src >= V) & (src < V + M)
        i_row = tl.where(is_i, src - V, 0).to(tl.int64)
        tl.store(gi_ptr + i_row[:, None] * D + cols[None, :], g_raw, mask=m2 & is_i[:, None])
    if HAS_F:
        is_f = (src < 0) & rmask
        part = tl.sum(tl.where(is_f[:, None] & m2, g, 0.0), axis=0)
        tl.atomic_add(gf_ptr + cols, part, mask=cmask)


@triton.jit
def _masked_embedding_backward_segments_kernel(
    grad_ptr, sorted_ptr, perm_ptr, seg_ptr, gw_ptr, gi_ptr, gf_ptr, D, V, M,
    HAS_W: tl.constexpr, HAS_I: tl.constexpr, HAS_F: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    a = tl.load(seg_ptr + seg)
    b = tl.load(seg_ptr + seg + 1)
    idv = tl.load(sorted_ptr + a)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Fixed-order sum of the segment's rows, BLOCK_R rows per step: deterministic.
    for i in range(a, b, BLOCK_R):
        r = i + tl.arange(0, BLOCK_R)
        rm = r < b
        rows = tl.load(perm_ptr + r, mask=rm, other=0).to(tl.int64)
        tile = tl.load(
            grad_ptr + rows[:, None] * D + cols[None, :],
            mask=rm[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(tile, axis=0)
    # The segment's id, broadcast over the column block (vector masks only).
    idvec = tl.zeros([BLOCK_D], dtype=tl.int64) + idv
    if HAS_W:
        ok_w = (idvec >= 0) & (idvec < V)
        w_row = tl.where(ok_w, idvec, 0)
        tl.store(gw_ptr + w_row * D + cols, acc.to(gw_ptr.dtype.element_ty), mask=cmask & ok_w)
    if HAS_I:
        ok_i = (idvec >= V) & (idvec < V + M)
        i_row = tl.where(ok_i, idvec - V, 0)
        tl.store(gi_ptr + i_row * D + cols, acc.to(gi_ptr.dtype.element_ty), mask=cmask & ok_i)
    if HAS_F:
        tl.store(gf_ptr + cols, acc, mask=cmask & (idvec < 0))


def _blocks(d: int) -> dict[str, int]:
    """The launchers' tile for rows of width ``d`` (every kernel here: ``BLOCK_R x BLOCK_D``,
    2048 elements, at most 512 columns)."""
    block_d = min(triton.next_power_of_2(max(d, 1)), 512)
    return dict(BLOCK_R=max(1, 2048 // block_d), BLOCK_D=block_d)


DTYPES = ("fp32", "fp16", "bf16")  # the table / feature dtypes (aimkp.ops checks them)


class LaunchConfig(NamedTuple):
    """One compiled variant: the kernel, its Triton signature and its constexprs."""

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]


def _flags(*names: str, need_one: bool = False) -> list[dict[str, bool]]:
    combos = [
        {n: bool(bits >> i & 1) for i, n in enumerate(names)} for bits in range(2 ** len(names))
    ]
    return [c for c in combos if any(c.values())] if need_one else combos


def gpu_launch_configs() -> list[LaunchConfig]:
    """Every (kernel, signature, constexprs) the launchers can launch: the tiles of
    :func:`_blocks` over all widths, times the dtypes, times the flags (a backward computes at
    least one gradient: the op skips it otherwise)."""
    tiles = sorted({tuple(_blocks(2**i).items()) for i in range(11)})
    i32 = "i32"
    out = []
    for dt in DTYPES:
        p = "*" + dt
        fwd = {"out_ptr": p, "src_ptr": "*i64", "w_ptr": p, "img_ptr": p, "fill_ptr": p}
        fwd.update({n: i32 for n in ("K", "D", "V", "M", "w_stride", "img_stride")})
        atomic = {"grad_ptr": p, "src_ptr": "*i64", "gw_ptr": "*fp32", "gi_ptr": p}
        atomic.update({"gf_ptr": "*fp32", "K": i32, "D": i32, "V": i32, "M": i32})
        seg = {"grad_ptr": p, "sorted_ptr": "*i64", "perm_ptr": "*i64", "seg_ptr": "*i64"}
        seg.update({"gi_ptr": p, "gf_ptr": "*fp32", "D": i32, "V": i32, "M": i32})
        for tile in tiles:
            for f in _flags("HAS_IMG", "HAS_FILL"):
                const = {**f, **dict(tile)}
                out.append(LaunchConfig("forward", _masked_embedding_forward_kernel, fwd, const))
            for f in _flags("HAS_W", "HAS_I", "HAS_F", need_one=True):
                const = {**f, **dict(tile)}
                out.append(
                    LaunchConfig("backward_atomic", _masked_embedding_backward_atomic_kernel,
                                 atomic, const)
                )  # fmt: skip
                # the segment reduction writes the table gradient in the grad dtype; without
                # one it gets the launcher's fp32 placeholder
                sig = {**seg, "gw_ptr": p if f["HAS_W"] else "*fp32"}
                out.append(
                    LaunchConfig("backward_segments",
                                 _masked_embedding_backward_segments_kernel, sig, const)
                )  # fmt: skip
    return out


def masked_embedding_forward(
    out: torch.Tensor,
    src: torch.Tensor,
    weight: torch.Tensor,
    image: torch.Tensor | None,
    fill: torch.Tensor | None,
) -> torch.Tensor:
    """Gather ``out[k] = source row src[k]``. out ``[K, D]`` contiguous, src ``[K]`` int64,
    weight ``[V, D]`` and image ``[M, D]`` (or None) with unit column stride, fill ``[D]`` or
    None."""
    k, d = out.shape
    if k == 0 or d == 0:
        return out
    blocks = _blocks(d)
    grid = (triton.cdiv(k, blocks["BLOCK_R"]), triton.cdiv(d, blocks["BLOCK_D"]))
    _masked_embedding_forward_kernel[grid](
        out_ptr=out, src_ptr=src, w_ptr=weight,
        img_ptr=image if image is not None else weight,
        fill_ptr=fill if fill is not None else weight,
        K=k, D=d, V=weight.shape[0], M=image.shape[0] if image is not None else 0,
        w_stride=weight.stride(0), img_stride=(image if image is not None else weight).stride(0),
        HAS_IMG=image is not None, HAS_FILL=fill is not None, **blocks,
    )  # fmt: skip
    return out


def masked_embedding_backward(
    grad: torch.Tensor,
    src: torch.Tensor,
    segments: NamedTuple | None,
    grad_weight: torch.Tensor | None,
    grad_image: torch.Tensor | None,
    grad_fill: torch.Tensor | None,
    num_rows: int,
    num_image_rows: int,
) -> None:
    """Accumulate ``grad [K, D]`` (contiguous) into the zeroed gradient buffers that are not None:
    ``grad_weight [V, D]`` (float32 for the atomics, any dtype for segments), ``grad_image
    [M, D]`` (``grad.dtype``), ``grad_fill [D]`` float32.

    ``segments`` (``sorted_src``, ``perm``, ``starts [S + 1]``, ``count``: see
    ``aimkp.ops.masked_embedding.sorted_segments``) selects the deterministic sorted segment
    reduction; None the fp32 atomics over ``src [K]``.
    """
    k, d = grad.shape
    if k == 0 or d == 0:
        return
    dummy32 = torch.empty(1, dtype=torch.float32, device=grad.device)
    common = dict(
        grad_ptr=grad,
        gw_ptr=grad_weight if grad_weight is not None else dummy32,
        gi_ptr=grad_image if grad_image is not None else grad,
        gf_ptr=grad_fill if grad_fill is not None else dummy32,
        D=d, V=num_rows, M=num_image_rows,
        HAS_W=grad_weight is not None, HAS_I=grad_image is not None, HAS_F=grad_fill is not None,
        **_blocks(d),
    )  # fmt: skip
    n_cols = triton.cdiv(d, common["BLOCK_D"])
    if segments is not None:
        _masked_embedding_backward_segments_kernel[(segments.count, n_cols)](
            sorted_ptr=segments.sorted_src, perm_ptr=segments.perm, seg_ptr=segments.starts,
            **common,
        )  # fmt: skip
        return
    _masked_embedding_backward_atomic_kernel[(triton.cdiv(k, common["BLOCK_R"]), n_cols)](
        src_ptr=src, K=k, **common
    )
