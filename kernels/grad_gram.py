"""Triton kernels for the per-sample gradient engine: per-row squared norms and pair inner products
of linear-layer weight gradients ``G_r = sum_{t in r} g_t a_t^T``, never writing ``G_r`` to memory.

Layout: the tokens of all rows are sorted by row; ``offsets [B + 1]`` gives each row's token range.

- ``_grad_gram_norm_kernel``: grid ``(B, n_tiles)``; a program owns row r and one
  ``(BLOCK_O x BLOCK_I)`` tile of ``G_r``: it forms the tile as a small matmul over the row's tokens
  (``BLOCK_T`` at a time, fp32 accumulation) and writes the tile's sum of squares to
  ``partial[r, tile]``.
- ``_grad_gram_pair_kernel``: grid ``(P, n_tiles)``; a program owns pair p = (i, j) and one tile:
  it forms the tiles of ``G_i`` and ``G_j`` side by side and writes their Frobenius product.
- ``_grad_gram_ghost_kernel``: the ghost form, grid ``(Q, n_t, n_s)``; a program owns one (i, j)
  row pair (``i == j`` for a norm) and one ``(BLOCK_T x BLOCK_S)`` block of token pairs, forms the
  blocks ``A = a_i[t] a_j[s]^T`` and ``K = g_i[t] g_j[s]^T`` by looping over ``d_in`` and ``d_out``,
  and writes ``sum(A * K)``: ``<G_i, G_j>_F = sum_{t in i, s in j} (a_t . a_s)(g_t . g_s)`` without
  forming ``G`` nor the ``[T, T]`` Gram matrices. For ``i == j`` it uses the symmetry (blocks below
  the diagonal are skipped, those above counted twice); blocks past a row's end skip their loops.

The launchers ``grad_gram_direct`` / ``grad_gram_ghost`` sum the per-program partials
(deterministic, no atomics); the partials start as NaN so a tile a program failed to write shows
up loudly. On the CPU the kernels run under ``TRITON_INTERPRET=1`` (inputs are upcast to fp32
there: the interpreter has no bf16 dot); on CUDA bf16 / fp16 inputs go to ``tl.dot`` as they are,
fp32 ones with IEEE precision, always accumulating in fp32.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["grad_gram_direct", "grad_gram_ghost"]


@triton.jit
def _tile_matmul(
    x_ptr,
    y_ptr,
    offs_m,
    mm,
    offs_n,
    mn,
    k_lo,
    k_hi,
    s_xm,
    s_xk,
    s_yk,
    s_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_F32: tl.constexpr,
):
    """``sum_{k_lo <= k < k_hi} x[m, k] y[k, n]`` for one ``(BLOCK_M x BLOCK_N)`` tile in fp32,
    both operands addressed by strides (so a transpose is a stride swap); ``k_hi <= k_lo`` gives
    zeros without a load."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < k_hi
        x = tl.load(
            x_ptr + offs_m[:, None] * s_xm + offs_k[None, :] * s_xk,
            mask=mm[:, None] & mk[None, :],
            other=0.0,
        )
        y = tl.load(
            y_ptr + offs_k[:, None] * s_yk + offs_n[None, :] * s_yn,
            mask=mk[:, None] & mn[None, :],
            other=0.0,
        )
        if CAST_F32:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc += tl.dot(x, y, input_precision="ieee")
    return acc


@triton.jit
def _tile_of_row(
    a_ptr, g_ptr, off_ptr, r, tile, N_TILES_I, D_IN, D_OUT, stride_a, stride_g,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, CAST_F32: tl.constexpr,
):  # fmt: skip
    """Tile number ``tile`` (row-major grid of ``(BLOCK_O x BLOCK_I)`` tiles) of row r's
    ``G_r = g_r^T a_r``: the contraction over the row's tokens ``offsets[r]:offsets[r + 1]``."""
    offs_o = (tile // N_TILES_I) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = (tile % N_TILES_I) * BLOCK_I + tl.arange(0, BLOCK_I)
    return _tile_matmul(
        g_ptr, a_ptr, offs_o, offs_o < D_OUT, offs_i, offs_i < D_IN,
        tl.load(off_ptr + r), tl.load(off_ptr + r + 1),
        1, stride_g, stride_a, 1, BLOCK_O, BLOCK_I, BLOCK_T, CAST_F32,
    )  # fmt: skip


@triton.jit
def _grad_gram_norm_kernel(
    a_ptr, g_ptr, off_ptr, partial_ptr, D_IN, D_OUT, stride_a, stride_g, N_TILES_I, N_TILES,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, CAST_F32: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    tile = tl.program_id(1)
    acc = _tile_of_row(a_ptr, g_ptr, off_ptr, r, tile, N_TILES_I, D_IN, D_OUT, stride_a, stride_g,
                       BLOCK_T, BLOCK_O, BLOCK_I, CAST_F32)  # fmt: skip
    tl.store(partial_ptr + r * N_TILES + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _grad_gram_pair_kernel(
    a_ptr, g_ptr, off_ptr, pair_ptr, partial_ptr, D_IN, D_OUT, stride_a, stride_g, N_TILES_I,
    N_TILES, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    CAST_F32: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    tile = tl.program_id(1)
    ri = tl.load(pair_ptr + 2 * p)
    rj = tl.load(pair_ptr + 2 * p + 1)
    acc_i = _tile_of_row(a_ptr, g_ptr, off_ptr, ri, tile, N_TILES_I, D_IN, D_OUT, stride_a,
                         stride_g, BLOCK_T, BLOCK_O, BLOCK_I, CAST_F32)  # fmt: skip
    acc_j = _tile_of_row(a_ptr, g_ptr, off_ptr, rj, tile, N_TILES_I, D_IN, D_OUT, stride_a,
                         stride_g, BLOCK_T, BLOCK_O, BLOCK_I, CAST_F32)  # fmt: skip
    tl.store(partial_ptr + p * N_TILES + tile, tl.sum(tl.sum(acc_i * acc_j, axis=1), axis=0))


@triton.jit
def _grad_gram_ghost_kernel(
    a_ptr,
    g_ptr,
    off_ptr,
    pair_ptr,
    partial_ptr,
    D_IN,
    D_OUT,
    stride_a,
    stride_g,
    N_BLOCKS_S,
    N_PARTIAL,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_F32: tl.constexpr,
):
    q = tl.program_id(0)
    tb = tl.program_id(1)
    sb = tl.program_id(2)
    ri = tl.load(pair_ptr + 2 * q)
    rj = tl.load(pair_ptr + 2 * q + 1)
    t0 = tl.load(off_ptr + ri) + tb * BLOCK_T
    t_end = tl.load(off_ptr + ri + 1)
    s0 = tl.load(off_ptr + rj) + sb * BLOCK_S
    s_end = tl.load(off_ptr + rj + 1)
    # a norm (i == j) is symmetric in (t, s): skip blocks below the diagonal, count those above
    # twice (BLOCK_T == BLOCK_S is required for this); blocks past a row's end contribute 0
    sym = ri == rj
    weight = tl.where(sym, tl.where(sb > tb, 2.0, tl.where(sb == tb, 1.0, 0.0)), 1.0)
    live = (t0 < t_end) & (s0 < s_end) & (weight > 0)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_s = s0 + tl.arange(0, BLOCK_S)
    mt = offs_t < t_end
    ms = offs_s < s_end
    # [T, T'] blocks of the two Gram matrices, contracting over the features
    ka = _tile_matmul(
        a_ptr, a_ptr, offs_t, mt, offs_s, ms, 0, tl.where(live, D_IN, 0),
        stride_a, 1, 1, stride_a, BLOCK_T, BLOCK_S, BLOCK_K, CAST_F32,
    )  # fmt: skip
    kg = _tile_matmul(
        g_ptr, g_ptr, offs_t, mt, offs_s, ms, 0, tl.where(live, D_OUT, 0),
        stride_g, 1, 1, stride_g, BLOCK_T, BLOCK_S, BLOCK_K, CAST_F32,
    )  # fmt: skip
    val = tl.sum(tl.sum(ka * kg, axis=1), axis=0) * weight
    tl.store(partial_ptr + q * N_PARTIAL + tb * N_BLOCKS_S + sb, val)


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(1, n))))


# The launch choices, as functions of the shapes and dtypes, so that every configuration the
# launchers can pick can be enumerated (gpu_launch_configs; the ahead-of-time compile test and
# benchmarks/triton_resources.py compile each one).


def direct_blocks(d_in: int, d_out: int, on_gpu: bool) -> dict[str, int]:
    """``BLOCK_T`` / ``BLOCK_O`` / ``BLOCK_I`` of the direct kernels for these widths."""
    cap = 64 if on_gpu else 128  # fewer, larger programs under the (per-program slow) interpreter
    return {
        "BLOCK_T": 32 if on_gpu else 64,
        "BLOCK_O": _block(d_out, cap),
        "BLOCK_I": _block(d_in, cap),
    }


def ghost_blocks(max_len: int, on_gpu: bool) -> dict[str, int]:
    """``BLOCK_T`` (= ``BLOCK_S``) / ``BLOCK_K`` of the ghost kernel for rows of ``max_len``."""
    bt = _block(max_len, 64)
    return {"BLOCK_T": bt, "BLOCK_S": bt, "BLOCK_K": 64 if on_gpu else 128}


def cast_f32(a_dtype: torch.dtype, g_dtype: torch.dtype, on_gpu: bool) -> bool:
    """Whether the kernels upcast operands to fp32: always under the interpreter (no bf16 dot),
    for fp32 inputs (IEEE dot) and for mixed dtypes; bf16 / fp16 pairs go to ``tl.dot`` as is."""
    return (not on_gpu) or a_dtype != g_dtype or a_dtype == torch.float32


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class LaunchConfig(NamedTuple):
    """One compiled variant: the kernel, its Triton signature and its constexprs."""

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]


def _widths(cap: int) -> list[int]:
    """Widths reaching every output of :func:`_block` (powers of two up to past the cap)."""
    return [2**i for i in range(cap.bit_length() + 1)]


def gpu_launch_configs() -> list[LaunchConfig]:
    """Every (kernel, signature, constexprs) :func:`grad_gram_direct` / :func:`grad_gram_ghost`
    can launch on CUDA: the block choices over all widths and row lengths, times the input
    dtype pairs (with their ``CAST_F32``)."""
    direct = {tuple(direct_blocks(i, o, True).items()) for i in _widths(64) for o in _widths(64)}
    ghost = {tuple(ghost_blocks(n, True).items()) for n in _widths(64)}
    dims = {"D_IN": "i32", "D_OUT": "i32", "stride_a": "i32", "stride_g": "i32"}
    out = []
    for da in DTYPES:
        for dg in DTYPES:
            io = {"a_ptr": "*" + _TT[da], "g_ptr": "*" + _TT[dg], "off_ptr": "*i64"}
            cast = {"CAST_F32": cast_f32(da, dg, True)}
            tiles = {"N_TILES_I": "i32", "N_TILES": "i32"}
            for blocks in sorted(direct):
                const = {**dict(blocks), **cast}
                sig = {**io, "partial_ptr": "*fp32", **dims, **tiles}
                out.append(LaunchConfig("grad_gram_norm", _grad_gram_norm_kernel, sig, const))
                sig = {**io, "pair_ptr": "*i64", "partial_ptr": "*fp32", **dims, **tiles}
                out.append(LaunchConfig("grad_gram_pair", _grad_gram_pair_kernel, sig, const))
            for blocks in sorted(ghost):
                sig = {**io, "pair_ptr": "*i64", "partial_ptr": "*fp32", **dims,
                       "N_BLOCKS_S": "i32", "N_PARTIAL": "i32"}  # fmt: skip
                const = {**dict(blocks), **cast}
                out.append(LaunchConfig("grad_gram_ghost", _grad_gram_ghost_kernel, sig, const))
    return out


class GramInputs(NamedTuple):
    """The launchers' checked inputs: ``a [N, d_in]`` / ``g [N, d_out]`` with unit column
    stride, ``offsets [B + 1]`` int64 on their device, whether they are on a GPU, and whether the
    kernels upcast operands to fp32 (``CAST_F32``)."""

    a: torch.Tensor
    g: torch.Tensor
    offsets: torch.Tensor
    on_gpu: bool
    cast_f32: bool


def _prepare(a: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor) -> GramInputs:
    """Check the launchers' inputs (:class:`GramInputs`): the kernels get
    fp32 operands on the CPU interpreter (no bf16 dot there), for fp32 inputs and for mixed
    dtypes; bf16 / fp16 go to ``tl.dot`` as they are on CUDA."""
    if a.dim() != 2 or g.dim() != 2 or a.shape[0] != g.shape[0]:
        raise ValueError(f"a [N, d_in] and g [N, d_out] expected, got {a.shape} and {g.shape}")
    if a.device != g.device:
        raise ValueError(f"a and g are on different devices ({a.device}, {g.device})")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be a 1-D [B + 1] tensor, got shape {tuple(offsets.shape)}")
    if a.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the Triton grad_gram kernels got {a.device.type} tensors: they run on CUDA, or on "
            "the CPU only under TRITON_INTERPRET=1 (set before triton is first imported)"
        )
    a = a.contiguous() if a.stride(-1) != 1 else a
    g = g.contiguous() if g.stride(-1) != 1 else g
    off = offsets.to(device=a.device, dtype=torch.int64).contiguous()
    on_gpu = a.device.type == "cuda"
    return GramInputs(a, g, off, on_gpu, cast_f32(a.dtype, g.dtype, on_gpu))


def grad_gram_direct(
    a: torch.Tensor,
    g: torch.Tensor,
    offsets: torch.Tensor,
    pairs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row ``||G_r||_F^2`` and pair ``<G_i, G_j>_F`` of ``G_r = sum_{t in r} g_t a_t^T``,
    direct form (tiles of ``G_r`` formed in registers; cost ``~N d_in d_out``).

    Args:
        a: ``[N, d_in]`` layer inputs, tokens sorted by row (fp32 / bf16 / fp16).
        g: ``[N, d_out]`` output gradients, same token order.
        offsets: ``[B + 1]`` int row offsets into the tokens.
        pairs: ``[P, 2]`` int row pairs, or None.

    Returns:
        ``(sq [B] float32, dots [P] float32 or None)``.
    """
    a, g, off, on_gpu, cast = _prepare(a, g, offsets)
    N, d_in = a.shape
    d_out = g.shape[1]
    B = off.numel() - 1
    dev = a.device
    blocks = direct_blocks(d_in, d_out, on_gpu)
    n_ti = triton.cdiv(d_in, blocks["BLOCK_I"])
    n_tiles = triton.cdiv(d_out, blocks["BLOCK_O"]) * n_ti
    common = dict(
        a_ptr=a, g_ptr=g, off_ptr=off, D_IN=d_in, D_OUT=d_out, stride_a=a.stride(0),
        stride_g=g.stride(0), N_TILES_I=n_ti, N_TILES=n_tiles, **blocks, CAST_F32=cast,
    )  # fmt: skip
    sq = torch.zeros(B, dtype=torch.float32, device=dev)
    if B and N:
        partial = torch.full((B, n_tiles), float("nan"), dtype=torch.float32, device=dev)
        _grad_gram_norm_kernel[(B, n_tiles)](partial_ptr=partial, **common)
        sq = partial.sum(1)
    if pairs is None:
        return sq, None
    P = pairs.shape[0]
    dots = torch.zeros(P, dtype=torch.float32, device=dev)
    if P and N:
        pr = pairs.to(device=dev, dtype=torch.int64).contiguous()
        partial = torch.full((P, n_tiles), float("nan"), dtype=torch.float32, device=dev)
        _grad_gram_pair_kernel[(P, n_tiles)](pair_ptr=pr, partial_ptr=partial, **common)
        dots = partial.sum(1)
    return sq, dots


def grad_gram_ghost(
    a: torch.Tensor,
    g: torch.Tensor,
    offsets: torch.Tensor,
    pairs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same numbers as :func:`grad_gram_direct`, ghost form: ``sum_{t, s} (a_t . a_s)
    (g_t . g_s)`` over blocks of token pairs (cost ``~T^2 (d_in + d_out)`` per row or pair; wins
    when rows are short against ``d_in d_out / (d_in + d_out)``). Neither ``G_r`` nor the ``[T, T]``
    Gram matrices are written to memory: one fp32 partial per program. Arguments and result as
    :func:`grad_gram_direct`.
    """
    a, g, off, on_gpu, cast = _prepare(a, g, offsets)
    N, d_in = a.shape
    d_out = g.shape[1]
    B = off.numel() - 1
    P = 0 if pairs is None else pairs.shape[0]
    dev = a.device
    rows = torch.arange(B, device=dev, dtype=torch.int64)
    q_pairs = torch.stack([rows, rows], 1)  # the norms first, then the asked-for pairs
    if P:
        q_pairs = torch.cat([q_pairs, pairs.to(device=dev, dtype=torch.int64)])
    Q = q_pairs.shape[0]
    max_len = int((off[1:] - off[:-1]).max()) if B else 0
    blocks = ghost_blocks(max_len, on_gpu)
    n_b = triton.cdiv(max(max_len, 1), blocks["BLOCK_T"])
    out = torch.zeros(Q, dtype=torch.float32, device=dev)
    if Q and N:
        partial = torch.full((Q, n_b * n_b), float("nan"), dtype=torch.float32, device=dev)
        _grad_gram_ghost_kernel[(Q, n_b, n_b)](
            a_ptr=a, g_ptr=g, off_ptr=off, pair_ptr=q_pairs.contiguous(), partial_ptr=partial,
            D_IN=d_in, D_OUT=d_out, stride_a=a.stride(0), stride_g=g.stride(0), N_BLOCKS_S=n_b,
            N_PARTIAL=n_b * n_b, **blocks, CAST_F32=cast,
        )  # fmt: skip
        out = partial.sum(1)
    return out[:B], (out[B:] if pairs is not None else None)
