"""hypothesis fuzz of ``aimkp.ops.masked_embedding`` on every CPU-runnable backend.

Each drawn call (random shapes, dtypes, id ranges, empty and larger inputs, optional keep / image
features / fill / ignore_index / compact, NaN and inf in the table) either matches the reference
backend or raises a ValueError where the reference does: out-of-range ids and a wrong image
feature count are ValueErrors, never a crash inside a kernel. The forward is a gather, so outputs
must be identical (NaN where the table holds NaN); fp32 gradients are compared with rtol 1e-5
(the kernels accumulate repeated ids in another order than the reference's index_add).
Triton runs under TRITON_INTERPRET=1 (set in conftest.py) on tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aimkp.ops import masked_embedding

# float64 only runs on the reference: the kernels must refuse it with a ValueError
DTYPES = [torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def calls(draw, max_tokens: int) -> dict:
    dtype = draw(st.sampled_from(DTYPES))
    v = draw(st.integers(1, 24))
    d = draw(st.sampled_from([0, 1, 3, 8, 17]))
    shape = draw(
        st.one_of(
            st.just((0,)),  # empty
            st.tuples(st.integers(1, max_tokens)),
            st.tuples(st.integers(1, 3), st.integers(0, max_tokens // 3)),
        )
    )
    n = 1
    for s in shape:
        n *= s
    img_id = draw(st.sampled_from([None, v, v + 5]))  # the image token lies outside the table
    ignore = draw(st.sampled_from([None, -100]))
    pool = list(range(v)) + [x for x in (img_id, ignore) if x is not None]
    if draw(st.integers(0, 4)) == 0:  # sometimes ids outside the table: a ValueError
        pool += [-1, v, v + 1]
    ids = torch.tensor(draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)))
    ids = ids.reshape(shape).long()
    weight = torch.randn(v, d, dtype=torch.float64).to(dtype)
    if d and draw(st.booleans()):  # non-finite values in the table
        weight[draw(st.integers(0, v - 1)), 0] = draw(st.sampled_from([float("nan"), float("inf")]))
    keep = None
    if draw(st.booleans()):
        keep = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
        keep = keep.reshape(shape)
    feats = None
    if img_id is not None and draw(st.booleans()):
        n_img = int((ids == img_id).sum()) + draw(st.sampled_from([0, 0, 0, 0, 1]))
        feats = torch.randn(n_img, d, dtype=torch.float64).to(dtype)
    fill = torch.randn(d, dtype=torch.float64).to(dtype) if draw(st.booleans()) else None
    return dict(
        input_ids=ids,
        weight=weight,
        keep=keep,
        image_features=feats,
        image_token_id=img_id if feats is not None else None,
        fill=fill,
        ignore_index=ignore,
        compact=draw(st.booleans()),
        deterministic=draw(st.booleans()),
    )


def _out_of_range(kw: dict) -> bool:
    ids, v = kw["input_ids"], kw["weight"].shape[0]
    special = torch.zeros_like(ids, dtype=torch.bool)
    for x in (kw["image_token_id"], kw["ignore_index"]):
        if x is not None:
            special |= ids == x
    return bool(((ids < 0) | (ids >= v))[~special].any())


def _run(kw: dict, backend: str) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    leaves = {k: kw[k].clone().requires_grad_(True) for k in ("weight", "image_features", "fill")
              if kw[k] is not None and kw[k].dtype == torch.float32}  # fmt: skip
    out = masked_embedding(**{**kw, **leaves}, backend=backend)
    values = out.values if kw["compact"] else out
    if leaves and values.numel():
        torch.manual_seed(0)
        (values * torch.randn_like(values)).sum().backward()
    # a leaf the output does not depend on may get None from autograd (the reference) or zeros
    # (a kernel's backward): both mean "no gradient"
    grads = [
        (leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(leaves[k]))
        if k in leaves
        else None
        for k in ("weight", "image_features", "fill")
    ]
    return values.detach(), grads


def _check(kw: dict, backend: str) -> None:
    try:
        want = _run(kw, "reference")
    except ValueError:
        with pytest.raises(ValueError):
            _run(kw, backend)
        return
    assert not _out_of_range(kw)
    if backend != "reference" and kw["weight"].dtype == torch.float64:
        with pytest.raises(ValueError, match="float32/float16/bfloat16"):
            _run(kw, backend)
        return
    got = _run(kw, backend)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    for g, w in zip(got[1], want[1]):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)


_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=120, **_SETTINGS)
@given(kw=calls(max_tokens=200))
def test_cpp_matches_reference_or_raises(kw: dict) -> None:
    _check(kw, "cpp")


@settings(max_examples=80, **_SETTINGS)
@given(kw=calls(max_tokens=12))
def test_triton_interpreted_matches_reference_or_raises(kw: dict) -> None:
    _check(kw, "triton")


@settings(max_examples=40, **_SETTINGS)
@given(kw=calls(max_tokens=60))
def test_out_of_range_ids_raise_value_error(kw: dict) -> None:
    """The reference itself (and so every backend, above) refuses out-of-range ids."""
    if _out_of_range(kw):
        with pytest.raises(ValueError, match="outside"):
            masked_embedding(**kw, backend="reference")
