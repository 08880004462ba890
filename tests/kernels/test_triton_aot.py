"""The Triton kernels (masked embedding, per-sample grad-gram) compile for real GPUs (sm_80 /
sm_90 cubin) on this GPU-less machine.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not that the compiler
accepts them (types, bf16 handling, atomics, loop bounds); this ahead-of-time compile does. It runs
in a subprocess because the interpreter setting of the test process replaces ``@triton.jit``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MASKED_EMBEDDING = r"""
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
import aimkp.kernels.masked_embedding as k

I = {n: "i32" for n in ("K", "D", "V", "M", "w_stride", "img_stride")}
n = 0
for arch in (80, 90):
    target = GPUTarget("cuda", arch, 32)
    for dt in ("fp32", "fp16", "bf16"):
        p = "*" + dt
        jobs = [
            (k._masked_embedding_forward_kernel,
             {"out_ptr": p, "src_ptr": "*i64", "w_ptr": p, "img_ptr": p, "fill_ptr": p,
              **{a: I[a] for a in ("K", "D", "V", "M", "w_stride", "img_stride")}},
             {"HAS_IMG": True, "HAS_FILL": True, "BLOCK_R": 4, "BLOCK_D": 512}),
            (k._masked_embedding_backward_atomic_kernel,
             {"grad_ptr": p, "src_ptr": "*i64", "gw_ptr": "*fp32", "gi_ptr": p,
              "gf_ptr": "*fp32", "K": "i32", "D": "i32", "V": "i32", "M": "i32"},
             {"HAS_W": True, "HAS_I": True, "HAS_F": True, "BLOCK_R": 4, "BLOCK_D": 512}),
            (k._masked_embedding_backward_segments_kernel,
             {"grad_ptr": p, "sorted_ptr": "*i64", "perm_ptr": "*i64", "seg_ptr": "*i64",
              "gw_ptr": p, "gi_ptr": p, "gf_ptr": "*fp32", "D": "i32", "V": "i32", "M": "i32"},
             {"HAS_W": True, "HAS_I": True, "HAS_F": True, "BLOCK_R": 4, "BLOCK_D": 512}),
        ]
        for fn, sig, const in jobs:
            sig = {**sig, **{c: "constexpr" for c in const}}
            out = compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target)
            assert out.asm["cubin"], (fn.__name__, dt, arch)
            n += 1
print("compiled", n)
"""


GRAD_GRAM = r"""
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
import aimkp.kernels.grad_gram as k

n = 0
for arch in (80, 90):
    target = GPUTarget("cuda", arch, 32)
    # fp32 inputs are upcast-free but go through the CAST_F32 path (IEEE dot); bf16 / fp16 go to
    # tl.dot as they are, as grad_gram_direct / grad_gram_ghost launch them on CUDA
    for dt, cast in (("fp32", True), ("fp16", False), ("bf16", False)):
        p = "*" + dt
        io = {"a_ptr": p, "g_ptr": p, "off_ptr": "*i64"}
        dims = {"D_IN": "i32", "D_OUT": "i32", "stride_a": "i32", "stride_g": "i32"}
        tiles = {"N_TILES_I": "i32", "N_TILES": "i32"}
        direct = {"BLOCK_T": 32, "BLOCK_O": 64, "BLOCK_I": 64, "CAST_F32": cast}
        jobs = [
            (k._grad_gram_norm_kernel, {**io, "partial_ptr": "*fp32", **dims, **tiles}, direct),
            (k._grad_gram_pair_kernel,
             {**io, "pair_ptr": "*i64", "partial_ptr": "*fp32", **dims, **tiles}, direct),
            (k._grad_gram_ghost_kernel,
             {**io, "pair_ptr": "*i64", "partial_ptr": "*fp32", **dims,
              "N_BLOCKS_S": "i32", "N_PARTIAL": "i32"},
             {"BLOCK_T": 64, "BLOCK_S": 64, "BLOCK_K": 64, "CAST_F32": cast}),
        ]
        for fn, sig, const in jobs:
            sig = {**sig, **{c: "constexpr" for c in const}}
            out = compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target)
            assert out.asm["cubin"], (fn.__name__, dt, arch)
            n += 1
print("compiled", n)
"""


@pytest.mark.slow
@pytest.mark.parametrize("script", ["masked_embedding", "grad_gram"])
def test_triton_kernels_compile_for_sm80_and_sm90(script: str) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = {"masked_embedding": MASKED_EMBEDDING, "grad_gram": GRAD_GRAM}[script]
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled 18" in res.stdout
