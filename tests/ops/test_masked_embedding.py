"""aimkp.ops.masked_embedding: every backend against the plain-PyTorch reference.

The reference runs in float64 on upcast copies of the very same low-precision inputs, so the only
error a backend may show is its fp32 accumulation plus one final rounding to the output dtype.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aimkp.ops import (
    CompactEmbedding,
    last_backend,
    masked_embedding,
    masked_embedding_reference,
    reset_backends,
)
from tests.helpers.cuda import poison, requires_cuda

# The module (the package attribute of the same name is the function).
me = importlib.import_module("aimkp.ops.masked_embedding")

# (atol, rtol) for gradients against the float64 reference. Forward outputs are exact copies in
# every dtype (no arithmetic), so they are compared with atol = rtol = 0.
GRAD_TOL = {
    # fp32 accumulation of up to ~130 unit-size terms: a few ulp of the sum.
    torch.float32: (1e-5, 1e-5),
    # fp32 sum rounded once to fp16 (half an ulp = 2^-11 relative) + fp32 accumulation error.
    torch.float16: (1e-3, 1e-3),
    # fp32 sum rounded once to bf16 (half an ulp = 2^-8 relative): twice that bound.
    torch.bfloat16: (8e-3, 8e-3),
}
# The "reference" backend is plain PyTorch, whose embedding backward and sums accumulate in the
# table dtype: its error (measured: 1e-2 at fp16, 8e-2 at bf16 on gradients of magnitude ~20) is
# PyTorch's own, about 1-2 ulp of the largest gradient; the kernels above accumulate in fp32.
REF_BACKEND_GRAD_TOL = {
    torch.float32: GRAD_TOL[torch.float32],
    torch.float16: (3e-2, 1e-2),
    torch.bfloat16: (2e-1, 5e-2),
}
DTYPES = list(GRAD_TOL)

V, D, T = 50, 60, 63  # odd sizes: D and T are not multiples of any block size
IMG = 9  # image tokens per row (a 3x3 grid)
IMAGE_TOKEN_ID = V  # outside the vocabulary, as in LLaVA's original code (-200 style)
IGNORE = -100

KERNEL_BACKENDS = [
    "cpp",
    "triton",
    pytest.param("cuda", marks=requires_cuda),
]


def _device(backend: str) -> str:
    return (
        "cuda"
        if backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
        else "cpu"
    )


def make_inputs(dtype: torch.dtype, device: str = "cpu", b: int = 2) -> dict:
    """ids [b, T]: text, an image span, repeated ids, the last table row, trailing padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (b, T), generator=g)
    ids[:, 5 : 5 + IMG] = IMAGE_TOKEN_ID
    ids[:, 20:30] = 7  # repeated ids within and across rows
    ids[0, -1] = V - 1  # the last row of the table
    if b > 1:
        ids[1, -4:] = IGNORE  # padding
    keep = torch.rand(b, T, generator=g) < 0.6
    keep[:, 20:23] = True
    weight = torch.randn(V, D, generator=g).to(dtype)
    feats = torch.randn(b * IMG, D, generator=g).to(dtype)
    fill = torch.randn(D, generator=g).to(dtype)
    return {
        "input_ids": ids.to(device),
        "weight": weight.to(device),
        "keep": keep.to(device),
        "image_features": feats.to(device),
        "image_token_id": IMAGE_TOKEN_ID,
        "fill": fill.to(device),
        "ignore_index": IGNORE,
    }


def _leaves(inp: dict, dtype: torch.dtype | None = None) -> dict:
    out = dict(inp)
    for k in ("weight", "image_features", "fill"):
        t = inp[k]
        out[k] = (t.to(dtype) if dtype is not None else t.clone()).detach().requires_grad_(True)
    return out


def _values(out):
    return out.values if isinstance(out, CompactEmbedding) else out


def run_with_grads(inp: dict, round_to: torch.dtype | None = None, **kw) -> tuple:
    """(output, grad_weight, grad_image_features, grad_fill) for a fixed upstream gradient.

    The upstream gradient is rounded to ``round_to`` (the dtype under test) first, so a float64
    reference sees exactly the values the kernel saw."""
    out = masked_embedding(**inp, **kw) if kw.get("backend") != "ref64" else None
    if out is None:
        kw = {k: v for k, v in kw.items() if k == "compact"}
        out = masked_embedding_reference(**inp, **kw)
    vals = _values(out)
    g = torch.Generator().manual_seed(2)
    up = torch.randn(vals.shape, generator=g).to(round_to or vals.dtype)
    up = up.to(device=vals.device, dtype=vals.dtype)
    leaves = (inp["weight"], inp["image_features"], inp["fill"])
    grads = torch.autograd.grad(vals, leaves, up, allow_unused=True)  # unused: M = 0 features
    return (out, *(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)))


def assert_matches_reference(inp: dict, dtype: torch.dtype, **kw) -> None:
    got = run_with_grads(_leaves(inp), **kw)
    ref = run_with_grads(
        _leaves(inp, torch.float64), dtype, backend="ref64", compact=kw.get("compact")
    )
    out, ref_out = got[0], ref[0]
    if isinstance(out, CompactEmbedding):
        for name in ("positions", "cu_seqlens", "index"):
            torch.testing.assert_close(getattr(out, name), getattr(ref_out, name))
    torch.testing.assert_close(_values(out).double(), _values(ref_out), atol=0, rtol=0)
    atol, rtol = (REF_BACKEND_GRAD_TOL if kw.get("backend") == "reference" else GRAD_TOL)[dtype]
    for name, a, r in zip(("weight", "image_features", "fill"), got[1:], ref[1:]):
        assert a.dtype == dtype, name
        torch.testing.assert_close(
            a.double(), r, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
@pytest.mark.parametrize(
    ("backend", "deterministic"),
    [
        ("cpp", False),  # cpp and reference have one backward, deterministic by construction
        ("reference", False),
        ("triton", False),
        ("triton", True),
        pytest.param("cuda", False, marks=requires_cuda),
        pytest.param("cuda", True, marks=requires_cuda),
    ],
)
def test_matches_reference(backend: str, deterministic: bool, compact: bool, dtype) -> None:
    inp = make_inputs(dtype, _device(backend))
    reset_backends()
    assert_matches_reference(
        inp, dtype, backend=backend, compact=compact, deterministic=deterministic
    )
    assert last_backend("masked_embedding") == backend


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_image_token_inside_vocab_and_1d_input(backend: str) -> None:
    """Qwen2-VL / llava-hf style: the image token is a real vocabulary id; 1-D input."""
    inp = make_inputs(torch.float32, _device(backend), b=1)
    inp["input_ids"] = inp["input_ids"].reshape(-1).clone()
    inp["keep"] = inp["keep"].reshape(-1)
    inp["input_ids"][inp["input_ids"] == IMAGE_TOKEN_ID] = 3
    inp["input_ids"][inp["input_ids"] == 3] = 3
    inp["image_token_id"] = 3
    n_img = int((inp["input_ids"] == 3).sum())
    inp["image_features"] = torch.randn(n_img, D, device=inp["weight"].device)
    for compact in (False, True):
        assert_matches_reference(inp, torch.float32, backend=backend, compact=compact)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_all_hidden_rows_and_no_fill(backend: str) -> None:
    inp = make_inputs(torch.float32, _device(backend))
    inp["keep"][1] = False  # a whole row hidden
    out = masked_embedding(**{**inp, "fill": None}, backend=backend)
    assert torch.all(out[1] == 0)
    c = masked_embedding(**inp, backend=backend, compact=True)
    k0 = int(inp["keep"][0].sum())
    assert c.cu_seqlens.tolist() == [0, k0, k0]
    assert_matches_reference(inp, torch.float32, backend=backend, compact=True)
    inp["keep"][:] = False
    assert_matches_reference(inp, torch.float32, backend=backend, compact=False)
    c = masked_embedding(**inp, backend=backend, compact=True)
    assert c.values.shape == (0, D) and c.cu_seqlens.tolist() == [0, 0, 0]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_empty_input(backend: str) -> None:
    dev = _device(backend)
    w = torch.randn(V, D, device=dev, requires_grad=True)
    fill = torch.randn(D, device=dev, requires_grad=True)
    for ids in (torch.zeros(0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)):
        ids = ids.to(dev)
        out = masked_embedding(ids, w, fill=fill, backend=backend)
        assert out.shape == (*ids.shape, D)
        gw, gf = torch.autograd.grad(out.sum(), (w, fill), allow_unused=True)
        assert gw is not None and torch.all(gw == 0) and torch.all(gf == 0)
        c = masked_embedding(ids, w, backend=backend, compact=True)
        assert c.values.shape == (0, D)
        assert c.cu_seqlens.tolist() == [0] * (ids.shape[0] + 1 if ids.dim() == 2 else 2)


def test_compact_worked_example() -> None:
    """The module docstring's example, every field written out."""
    w = torch.arange(10 * 2, dtype=torch.float32).reshape(10, 2)
    ids = torch.tensor([[1, 9, 9, 3], [4, -100, 9, 5]])
    keep = torch.tensor([[True, True, False, True], [False, True, True, True]])
    feats = torch.tensor([[100.0, 101.0], [102.0, 103.0], [104.0, 105.0]])
    fill = torch.tensor([-1.0, -2.0])
    for backend in ("cpp", "triton", "reference"):
        dev = _device(backend)
        args = [t.to(dev) for t in (ids, w, keep, feats)]
        c = masked_embedding(*args, 9, fill.to(dev), -100, compact=True, backend=backend)
        assert c.positions.tolist() == [0, 1, 3, 1, 2, 3]
        assert c.index.tolist() == [0, 1, 3, 5, 6, 7]
        assert c.cu_seqlens.dtype == torch.int32 and c.cu_seqlens.tolist() == [0, 3, 6]
        assert c.values.tolist() == [
            [2.0, 3.0],  # id 1
            [100.0, 101.0],  # first image token
            [6.0, 7.0],  # id 3 (the hidden image token at 2 consumed feature row 1)
            [-1.0, -2.0],  # ignore_index -> fill
            [104.0, 105.0],  # third image token
            [10.0, 11.0],  # id 5
        ]


def test_poisoned_buffers_are_fully_written(monkeypatch) -> None:
    """Every buffer a kernel must write starts as NaN: an unwritten row fails loudly."""
    monkeypatch.setattr(
        me,
        "_empty",
        lambda *s, dtype, device="cpu": poison(torch.empty(*s, dtype=dtype, device=device)),
    )
    for dtype in DTYPES:
        for backend in ("cpp", "triton", "cuda"):
            if backend == "cuda" and not torch.cuda.is_available():
                continue  # the CUDA C++ kernels need a GPU to run
            inp = make_inputs(dtype, _device(backend))
            got = run_with_grads(_leaves(inp), backend=backend)
            for t in got:
                assert not torch.isnan(t.float()).any(), (backend, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic_backward_is_bitwise_repeatable(backend: str) -> None:
    inp = make_inputs(torch.float32, _device(backend))
    a = run_with_grads(_leaves(inp), backend=backend, deterministic=True)
    b = run_with_grads(_leaves(inp), backend=backend, deterministic=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_int32_ids_and_noncontiguous_weight() -> None:
    inp = make_inputs(torch.float32)
    big = torch.randn(V, 2 * D)
    for w in (big[:, ::2], big[:, :D]):  # column stride 2 (copied); row stride 2D (read in place)
        args = {**inp, "weight": w}
        ref = masked_embedding_reference(**args)
        assert torch.equal(masked_embedding(**{**args, "input_ids": inp["input_ids"].int()}), ref)
        assert torch.equal(masked_embedding(**args, backend="cpp"), ref)
        dev = _device("triton")
        on_dev = {k: (t.to(dev) if isinstance(t, torch.Tensor) else t) for k, t in args.items()}
        assert torch.equal(masked_embedding(**on_dev, backend="triton").cpu(), ref)


def test_auto_backend_and_debug_log(caplog) -> None:
    inp = make_inputs(torch.float32)
    with caplog.at_level(logging.DEBUG, logger="aimkp.ops"):
        masked_embedding(**inp)
    assert last_backend("masked_embedding") == "cpp"
    assert "backend=cpp" in caplog.text
    masked_embedding(
        **{
            **inp,
            "weight": inp["weight"].double(),
            "image_features": inp["image_features"].double(),
            "fill": None,
        }
    )
    assert last_backend("masked_embedding") == "reference"  # fp64 has no kernel


def _random_case(b, t, d, v, n_img, p_keep, seed) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, t), generator=g)
    n_img = min(n_img, t)
    ids[:, :n_img] = -5  # image token id outside [0, v)
    keep = torch.rand(b, t, generator=g) < p_keep
    return {
        "input_ids": ids,
        "weight": torch.randn(v, d, generator=g),
        "keep": keep,
        "image_features": torch.randn(b * n_img, d, generator=g),
        "image_token_id": -5,
        "fill": torch.randn(d, generator=g),
        "ignore_index": None,
    }


SHAPES = {
    "b": st.integers(1, 3),
    "t": st.integers(0, 33),
    "d": st.integers(1, 70),
    "v": st.integers(1, 20),
    "n_img": st.integers(0, 5),
    "p_keep": st.floats(0.0, 1.0),
    "seed": st.integers(0, 2**16),
}


@settings(max_examples=40, deadline=None)
@given(**SHAPES)
def test_cpp_hypothesis_shapes(b, t, d, v, n_img, p_keep, seed) -> None:
    inp = _random_case(b, t, d, v, n_img, p_keep, seed)
    for compact in (False, True):
        assert_matches_reference(inp, torch.float32, backend="cpp", compact=compact)


@settings(max_examples=25, deadline=None)  # interpreted Triton: ~1 ms per program instance
@given(**SHAPES, deterministic=st.booleans())
def test_triton_hypothesis_shapes(b, t, d, v, n_img, p_keep, seed, deterministic) -> None:
    inp = _random_case(b, t, d, v, n_img, p_keep, seed)
    dev = _device("triton")
    inp = {k: (x.to(dev) if isinstance(x, torch.Tensor) else x) for k, x in inp.items()}
    for compact in (False, True):
        kw = {"backend": "triton", "compact": compact, "deterministic": deterministic}
        assert_matches_reference(inp, torch.float32, **kw)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_errors_on_values(backend: str) -> None:
    inp = make_inputs(torch.float32, _device(backend))
    bad = dict(inp, input_ids=inp["input_ids"].clone())
    bad["input_ids"][1, 40] = V + 1  # past the last row (V itself is the image token)
    with pytest.raises(
        ValueError, match=r"input_ids: id 51 at flat index 103 is outside \[0, 50\)"
    ):
        masked_embedding(**bad, backend=backend)
    bad["input_ids"][1, 40] = -1  # negative, not the ignore value
    with pytest.raises(ValueError, match="input_ids: id -1"):
        masked_embedding(**bad, backend=backend)
    with pytest.raises(ValueError, match="fewer features than image tokens"):
        masked_embedding(**dict(inp, image_features=inp["image_features"][:-1]), backend=backend)
    more = torch.cat([inp["image_features"], inp["image_features"][:1]])
    with pytest.raises(ValueError, match="more features than image tokens"):
        masked_embedding(**dict(inp, image_features=more), backend=backend)
    with pytest.raises(ValueError, match="0 rows given but input_ids holds 18 image tokens"):
        masked_embedding(**dict(inp, image_features=None), backend=backend)


def test_errors_on_arguments() -> None:
    inp = make_inputs(torch.float32)
    cases = [
        (dict(keep=inp["keep"][:, :-1]), "keep has shape"),
        (dict(keep=inp["keep"].int()), "keep must be a bool tensor"),
        (dict(input_ids=inp["input_ids"].float()), "input_ids must be int64 or int32"),
        (dict(input_ids=inp["input_ids"][None]), r"input_ids must be \[N\] or \[B, T\]"),
        (dict(weight=inp["weight"][0]), r"weight must be a \[V, D\] tensor"),
        (dict(image_features=inp["image_features"].half()), "image_features dtype"),
        (dict(image_features=inp["image_features"][:, :-1]), "image_features has width 59"),
        (dict(image_token_id=None), "image_features given without image_token_id"),
        (dict(fill=inp["fill"][:-1]), r"fill must be a \[D\]=\[60\] tensor"),
        (dict(fill=inp["fill"].half()), "fill dtype"),
        (dict(ignore_index=IMAGE_TOKEN_ID), "image_token_id and ignore_index are both"),
        (dict(input_ids=inp["input_ids"].to("meta")), "input_ids is on meta"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            masked_embedding(**{**inp, **change})
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_embedding(**inp, backend="fast")
    with pytest.raises(ValueError, match="backend='cpp' supports float32/float16/bfloat16"):
        masked_embedding(
            **{
                **inp,
                "weight": inp["weight"].double(),
                "image_features": None,
                "image_token_id": None,
                "fill": None,
            },
            backend="cpp",
        )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
            masked_embedding(**inp, backend="cuda")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_frozen_table_only_features_and_fill_get_gradients(backend: str) -> None:
    """LoRA set-up: the table is frozen; only the projector's features and the fill learn."""
    inp = make_inputs(torch.float32, _device(backend))
    feats = inp["image_features"].clone().requires_grad_(True)
    fill = inp["fill"].clone().requires_grad_(True)
    out = masked_embedding(**{**inp, "image_features": feats, "fill": fill}, backend=backend)
    assert not inp["weight"].requires_grad
    gi, gf = torch.autograd.grad(out.sum(), (feats, fill))
    ref = masked_embedding_reference(**{**inp, "image_features": feats, "fill": fill})
    ri, rf = torch.autograd.grad(ref.sum(), (feats, fill))
    torch.testing.assert_close(gi, ri, atol=0, rtol=0)  # single rows: exact copies
    torch.testing.assert_close(gf, rf, atol=1e-5, rtol=1e-5)  # fp32 sum over ~50 hidden rows
