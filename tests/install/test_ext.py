"""The compiled extension aimkp._C: build flags and its raw-pointer entry points."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from aimkp._ext import DTYPE_CODES, load_ext


def test_extension_loads_and_reports_its_build() -> None:
    ext = load_ext()
    assert isinstance(ext.has_cuda(), bool)
    assert ext.max_threads() >= 1


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("AIMKP_SKIP_CUDA_BUILD") == "1",
    reason="nvcc absent (or CUDA build skipped on purpose): nothing to check",
)
def test_cuda_sources_were_compiled_when_nvcc_exists() -> None:
    """nvcc is on this machine, so the installed build must contain the CUDA kernels: the .cu
    sources are compiled by every build here, even though they cannot run without a GPU."""
    ext = load_ext()
    assert ext.has_cuda()
    assert hasattr(ext, "masked_embedding_forward_cuda")
    assert hasattr(ext, "masked_embedding_backward_segments_cuda")


def _sum_pairs_via_backward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row v of the weight gradient = x[v] + y[v] (two occurrences of id v), through the C++
    backward: fp32 accumulation and one conversion back to x.dtype."""
    ext = load_ext()
    v = x.numel()
    grad = torch.stack([x, y], dim=1).reshape(2 * v, 1).contiguous()
    sorted_src = torch.arange(v).repeat_interleave(2)
    perm = torch.arange(2 * v)
    gw = torch.empty(v, 1, dtype=x.dtype)
    ext.masked_embedding_backward_cpu(
        grad.data_ptr(), 2 * v, 1, sorted_src.data_ptr(), perm.data_ptr(), gw.data_ptr(), v,
        0, 0, 0, DTYPE_CODES[x.dtype],
    )  # fmt: skip
    return gw.reshape(-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_conversions_roundtrip_every_value(dtype: torch.dtype) -> None:
    """x + 0 converts x to fp32 and back: every one of the 65536 bit patterns must survive."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    out = _sum_pairs_via_backward(x, torch.zeros_like(x))
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), x[~nan].view(torch.int16) * (x[~nan] != 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_rounding_is_round_to_nearest_even(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-9, 4, 20000, dtype=torch.float32)
    x = (torch.randn(20000, generator=g) * scale).to(dtype)
    y = (torch.randn(20000, generator=g) * scale).to(dtype)
    expected = (x.float() + y.float()).to(dtype)  # torch: fp32 sum, RNE conversion
    out = _sum_pairs_via_backward(x, y)
    nz = expected != 0  # the sum starts from +0.0, so -0 + -0 gives +0 (equal values)
    assert torch.equal(out == 0, ~nz)
    assert torch.equal(out[nz].view(torch.int16), expected[nz].view(torch.int16))


def test_forward_raw_pointers_zero_rows_without_fill() -> None:
    ext = load_ext()
    w = torch.randn(5, 7, dtype=torch.bfloat16)
    src = torch.tensor([4, -1, 0, 4])
    out = torch.full((4, 7), float("nan"), dtype=torch.bfloat16)
    ext.masked_embedding_forward_cpu(
        out.data_ptr(), src.data_ptr(), 4, 7, w.data_ptr(), 5, 7, 0, 0, 0, 0, 2
    )
    assert torch.equal(out, torch.stack([w[4], torch.zeros(7, dtype=w.dtype), w[0], w[4]]))
    ext.masked_embedding_forward_cpu(0, 0, 0, 7, w.data_ptr(), 5, 7, 0, 0, 0, 0, 2)  # K = 0


def test_backends_call_every_entry_point_with_its_keywords(monkeypatch) -> None:
    """The op's wrappers call aimkp._C with keywords: each call must name exactly the binding's
    arguments (checked against the pybind11 signatures, so the CUDA wrappers are checked without
    a GPU; nothing runs)."""
    import re
    import sys

    import aimkp.ops  # noqa: F401

    me = sys.modules["aimkp.ops.masked_embedding"]
    ext = load_ext()
    called = []

    class Recorder:
        def __getattr__(self, name: str):
            sig = getattr(ext, name).__doc__.split("\n")[0]
            names = set(re.findall(r"(\w+): ", sig.split("(", 1)[1]))

            def call(**kw) -> None:
                assert set(kw) == names, (name, names ^ set(kw))
                called.append(name)

            return call

    monkeypatch.setattr(me, "load_ext", Recorder)
    monkeypatch.setattr(me, "_stream_of", lambda t: 0)
    src = torch.tensor([0, 1, 1, -1, 3])
    launch = me.ForwardLaunch.prepare(src, torch.randn(3, 4), torch.randn(1, 4), torch.randn(4))
    me._forward_cpp(launch)
    backward = me.BackwardLaunch(torch.randn(5, 4), src, 3, 1, True, True, True, False)
    me._backward_cpp(backward)
    expected = ["masked_embedding_forward_cpu", "masked_embedding_backward_cpu"]
    if ext.has_cuda():
        me._forward_cuda(launch)
        me._backward_cuda(backward)
        me._backward_cuda(backward._replace(deterministic=True))
        expected += [
            "masked_embedding_forward_cuda",
            "masked_embedding_backward_atomic_cuda",
            "masked_embedding_backward_segments_cuda",
        ]
    assert called == expected
