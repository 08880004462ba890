"""The row forward's frozen vision tower: under no_grad, in chunks of images, the same features
as one call over every image (aimkp/models/forward.py)."""

from __future__ import annotations

import pytest
import torch

from aimkp.models import forward as fw
from tests.helpers.models import (
    records,
    tiny,
)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2vl"])
def test_chunked_no_grad_tower_equals_one_call(name, monkeypatch):
    loaded = tiny(name)
    samples = [loaded.adapter.encode(r) for r in records() * 2]  # 6 images, 2 text-only
    monkeypatch.setattr(fw, "TOWER_CHUNK_IMAGES", 4)
    got = fw._frozen_tower_hidden(loaded, samples)
    want = loaded.adapter.sample_vision_hidden(samples)
    assert [g is None for g in got] == [w is None for w in want]
    for g, w in zip(got, want):
        if g is not None:
            assert not g.requires_grad  # nothing of the frozen tower is kept for a backward
            torch.testing.assert_close(g, w.detach(), rtol=1e-5, atol=1e-6)


def test_trainable_tower_keeps_its_graph():
    loaded = tiny("tiny-llava")
    next(loaded.adapter.vision_tower.parameters()).requires_grad_(True)
    samples = [loaded.adapter.encode(r) for r in records()[:1]]
    (h,) = fw._frozen_tower_hidden(loaded, samples)
    assert h.requires_grad
