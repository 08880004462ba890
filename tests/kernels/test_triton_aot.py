"""The Triton kernels (masked embedding, per-sample grad-gram) compile for real GPUs (sm_80 /
sm_90 cubin) on this GPU-less machine, in every configuration their launchers can pick.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not that the compiler
accepts them (types, bf16 handling, atomics, loop bounds); this ahead-of-time compile does. The
configurations come from the launchers' selection functions (``gpu_launch_configs()``); the
compile test takes a cover of them (every tile, dtype and flag value of each kernel at least
once: ``benchmarks/triton_resources.py --all`` compiles the whole product), and a fast test checks
that what the launchers choose for any shape is among them, so a new choice cannot escape. The
compiles run in a subprocess because the interpreter setting of the test process replaces
``@triton.jit``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

COMPILE = r"""
from benchmarks import triton_resources as T

cfgs = T.covering_subset(T.configs({module!r}))
for cfg in cfgs:
    out = T.compile_config(cfg, {arch})
    assert out.asm["cubin"], (cfg.name, cfg.constexprs)
print("compiled", len(cfgs))
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("module", ["masked_embedding", "grad_gram"])
def test_every_launch_choice_compiles(module: str, arch: int) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = COMPILE.format(module=module, arch=arch)
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True
    )  # run from the checkout: `-c` puts it first on the path, so benchmarks is ours
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled" in res.stdout


def _features(cfgs):
    from benchmarks import triton_resources as T

    return set().union(*(T._features(c) for c in cfgs))


@pytest.mark.parametrize("module", ["masked_embedding", "grad_gram"])
def test_cover_exercises_every_value(module):
    """The compiled cover holds every tile, flag and dtype value of the full enumeration."""
    pytest.importorskip("triton")
    from benchmarks import triton_resources as T

    cfgs = T.configs(module)
    assert _features(T.covering_subset(cfgs)) == _features(cfgs)


def test_launcher_choices_are_enumerated():
    """Whatever tile the launchers pick for a width / row length is an enumerated one."""
    pytest.importorskip("triton")
    import torch

    from benchmarks import triton_resources as T

    me = T.load_kernels("masked_embedding")
    cfgs = me.gpu_launch_configs()
    for d in [1, 3, 64, 100, 511, 512, 513, 3584, 4096, 10**5]:
        tile = me._blocks(d)
        assert any(all(c.constexprs[k] == v for k, v in tile.items()) for c in cfgs), d
    gg = T.load_kernels("grad_gram")
    consts = [c.constexprs for c in gg.gpu_launch_configs()]
    for d_in in [1, 7, 16, 100, 128, 3584]:
        for d_out in [1, 33, 4096, 18944]:
            for a, g in [
                (torch.bfloat16,) * 2,
                (torch.float32,) * 2,
                (torch.bfloat16, torch.float32),
            ]:
                want = {**gg.direct_blocks(d_in, d_out, True), "CAST_F32": gg.cast_f32(a, g, True)}
                assert want in consts, want
    for n in [1, 17, 64, 65, 700, 5000]:
        want = {**gg.ghost_blocks(n, True), "CAST_F32": False}
        assert want in consts, want
