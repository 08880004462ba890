"""PMM: keep offsets, keep masks, the stride schedule and the distributed reconcile."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aimkp.method.pmm import (
    IMAGE,
    TEXT,
    StrideTable,
    build_keep,
    image_keep_offsets,
    reconcile_strides,
    text_keep_offsets,
)


def test_text_offsets_examples() -> None:
    assert text_keep_offsets(7, 2).tolist() == [1, 3, 5]
    assert text_keep_offsets(7, 3).tolist() == [2, 5]
    assert text_keep_offsets(7, 7).tolist() == [6]
    assert text_keep_offsets(7, 8).tolist() == [6]  # g > n: only the last
    assert text_keep_offsets(7, -4).tolist() == [3]  # frozen strides act by |g|
    assert text_keep_offsets(0, 2).tolist() == []


def test_image_offsets_paper_counts() -> None:
    # 24 x 24 LLaVA grid: 144, 36, 9, 1 tokens kept for g = 2, 4, 8, 16 (PMM's image strides)
    assert [image_keep_offsets(24, 24, g).numel() for g in (2, 4, 8, 16)] == [144, 36, 9, 1]
    assert image_keep_offsets(24, 24, 16).tolist() == [15 * 24 + 15]
    assert image_keep_offsets(4, 4, 2).tolist() == [5, 7, 13, 15]
    assert image_keep_offsets(4, 4, 5).tolist() == [15]
    assert image_keep_offsets(3, 5, 4).tolist() == [14]  # beyond the short side: last token


@given(n=st.integers(1, 300), g=st.integers(1, 400))
def test_text_offsets_property(n: int, g: int) -> None:
    off = text_keep_offsets(n, g)
    assert off.numel() >= 1 and int(off.max()) < n
    if g <= n:
        assert off.numel() == n // g
        assert all(((o + 1) % g) == 0 for o in off.tolist())
    else:
        assert off.tolist() == [n - 1]


@given(h=st.integers(1, 30), w=st.integers(1, 30), g=st.integers(1, 40))
def test_image_offsets_property(h: int, w: int, g: int) -> None:
    off = image_keep_offsets(h, w, g)
    assert off.numel() >= 1 and int(off.max()) < h * w
    if g <= h and g <= w:
        rows, cols = off // w, off % w
        assert off.numel() == (h // g) * (w // g)
        assert bool(((rows + 1) % g == 0).all()) and bool(((cols + 1) % g == 0).all())


def _sample(T: int = 20, text=(12, 17), image=(2, 11), grid=(3, 3)) -> SimpleNamespace:
    return SimpleNamespace(
        input_ids=torch.arange(T), text_span=text, image_span=image, grid=grid, n_answer_tokens=2
    )


def test_build_keep_only_touches_its_span() -> None:
    s = _sample()
    assert bool(build_keep(s, None).all())
    kt = build_keep(s, TEXT, 2)
    assert (~kt).nonzero().reshape(-1).tolist() == [12, 14, 16]
    ki = build_keep(s, IMAGE, 2)
    # grid 3x3 at 2..10, stride 2 keeps cell (1, 1) = offset 4 -> position 6
    assert (~ki).nonzero().reshape(-1).tolist() == [2, 3, 4, 5, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="image grid"):
        build_keep(_sample(grid=(2, 2)), IMAGE, 2)
    with pytest.raises(ValueError, match="text span"):
        build_keep(_sample(text=None), TEXT, 2)
    with pytest.raises(ValueError, match="unknown copy kind"):
        build_keep(s, "audio", 2)


def test_schedule() -> None:
    t = StrideTable(3)
    s = _sample()
    assert [c.kind for c in t.copies(0, s, 0)] == [None]  # first visit: original only
    t.update(0, None, None)
    assert (int(t.text[0]), int(t.image[0])) == (2, 2)
    assert [(c.kind, c.stride) for c in t.copies(0, s, 5)] == [(None, 1), (TEXT, 2), (IMAGE, 2)]
    assert all(c.sample == 5 for c in t.copies(0, s, 5))
    t.update(0, True, True)
    assert (int(t.text[0]), int(t.image[0])) == (4, 4)
    t.update(0, True, False)  # image fails at 4 -> max(2, 2) = 2, frozen
    assert (int(t.text[0]), int(t.image[0])) == (8, -2)
    t.update(0, False, True)  # text fails at 8 -> 4 frozen; frozen image never changes
    assert (int(t.text[0]), int(t.image[0])) == (-4, -2)
    assert [(c.kind, c.stride) for c in t.copies(0, s, 0)] == [(None, 1), (TEXT, 4), (IMAGE, 2)]
    t.update(0, True, True)
    assert (int(t.text[0]), int(t.image[0])) == (-4, -2)
    # g = 2 failing stays at 2 (frozen); large strides halve
    t.text[1], t.image[1] = 2, 32
    t.update(1, False, False)
    assert (int(t.text[1]), int(t.image[1])) == (-2, -16)
    # a sample without image: no image copy ever, its stride just leaves 1
    t.update(2, None, None)
    no_img = _sample(image=None)
    assert [c.kind for c in t.copies(2, no_img, 0)] == [None, TEXT]
    t.update(2, True, None)
    assert (int(t.text[2]), int(t.image[2])) == (4, 2)


def test_state_roundtrip_and_mismatch() -> None:
    t = StrideTable(4)
    t.text[1] = -8
    u = StrideTable(4)
    u.load_state_dict(t.state_dict())
    assert torch.equal(u.text, t.text) and torch.equal(u.image, t.image)
    with pytest.raises(ValueError, match="does not match"):
        StrideTable(5).load_state_dict(t.state_dict())


def test_reconcile() -> None:
    tables = torch.tensor(
        [
            [1, 2, 8, 4, -2, 4],
            [2, 4, -4, 8, 16, -8],
            [2, 2, 16, 2, -4, -2],
        ]
    )
    # no frozen -> largest; any frozen -> smallest (the most negative stored value)
    assert reconcile_strides(tables).tolist() == [2, 4, -4, 8, -4, -8]
    assert reconcile_strides(list(tables)).tolist() == [2, 4, -4, 8, -4, -8]
    with pytest.raises(ValueError, match="stacked"):
        reconcile_strides(torch.ones(3, dtype=torch.long))
    # without an initialised process group the table is returned unchanged
    t = StrideTable(6)
    t.text = tables[0].clone()
    t.reconcile()
    assert t.text.tolist() == tables[0].tolist()
