"""Gradient-based Filtering decisions and weights on synthetic cosines."""

from __future__ import annotations

import pytest
import torch

from aimkp.method.gf import decide, pairs_of, provisional_weights, robust_z
from aimkp.method.pmm import IMAGE, TEXT, Copy

# sample 0: orig + text + image; sample 1: orig only; sample 2: orig + image
ROWS = [
    Copy(0, None, 1),
    Copy(0, TEXT, 2),
    Copy(0, IMAGE, 2),
    Copy(1, None, 1),
    Copy(2, None, 1),
    Copy(2, IMAGE, 4),
]
N = 20.0


def test_pairs_and_provisional() -> None:
    assert pairs_of(ROWS).tolist() == [[0, 1], [0, 2], [4, 5]]
    w0 = provisional_weights(ROWS, N)
    torch.testing.assert_close(
        w0, torch.tensor([1 / 60, 1 / 60, 1 / 60, 1 / 20, 1 / 40, 1 / 40], dtype=torch.float64)
    )
    assert torch.equal(
        provisional_weights(ROWS, N, "sum"), torch.full((6,), 1 / 20.0, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="original is missing"):
        pairs_of([Copy(0, TEXT, 2)])
    with pytest.raises(ValueError, match="> 0"):
        provisional_weights(ROWS, 0)


def test_all_kept_is_identity() -> None:
    d = decide(ROWS, torch.tensor([0.9, 0.9, 0.9]), N)
    assert bool(d.kept.all())
    torch.testing.assert_close(d.row_scale, torch.ones(6, dtype=torch.float64))
    assert d.text_passed == [True, None, None] and d.image_passed == [True, None, True]


def test_rejections_renormalise() -> None:
    # text copy 0.05 < 0.1 rejected; image copy 0.5 >= 0.4 kept; sample 2 image 0.3 < 0.4 rejected
    d = decide(ROWS, torch.tensor([0.05, 0.5, 0.3]), N)
    assert d.kept.tolist() == [True, False, True, True, True, False]
    want = torch.tensor([1 / 40, 0, 1 / 40, 1 / 20, 1 / 20, 0], dtype=torch.float64)
    torch.testing.assert_close(d.weights, want)
    torch.testing.assert_close(d.row_scale, want / provisional_weights(ROWS, N))
    assert d.text_passed == [False, None, None] and d.image_passed == [True, None, False]
    assert (d.text_kept, d.image_kept, d.num_text_copies, d.num_image_copies) == (0, 1, 1, 2)
    # each sample's kept weights sum to n_i-normalised 1/N per "sample unit"
    per_sample = [
        float(d.weights[[0, 1, 2]].sum()),
        float(d.weights[3]),
        float(d.weights[[4, 5]].sum()),
    ]
    assert per_sample == pytest.approx([1 / 20] * 3)


def test_thresholds_configurable_and_boundary() -> None:
    c = torch.tensor([0.1, 0.4, 0.4])
    d = decide(ROWS, c, N)  # equal to the threshold: kept (only "below" rejects)
    assert bool(d.kept.all())
    d = decide(ROWS, c, N, tau_text=0.2, tau_image=0.5)
    assert d.kept.tolist() == [True, False, False, True, True, False]
    d = decide(ROWS, torch.tensor([float("nan"), 1.0, 1.0]), N)
    assert d.kept.tolist() == [True, False, True, True, True, True]  # NaN cosine: rejected


def test_sum_reduce() -> None:
    d = decide(ROWS, torch.tensor([0.05, 0.5, 0.3]), N, reduce="sum")
    torch.testing.assert_close(d.weights, torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.float64) / N)
    torch.testing.assert_close(d.row_scale, torch.tensor([1, 0, 1, 1, 1, 0]).double())


def test_grand_pruning() -> None:
    z = robust_z(torch.tensor([1.0, 1.1, 0.9, 1.0, 10.0]))
    assert float(z[4]) > 10 and float(z[:4].abs().max()) < 1.5
    assert torch.equal(robust_z(torch.tensor([1.0, 1.0, 1.0])), torch.zeros(3, dtype=torch.float64))
    rows = [Copy(b, None, 1) for b in range(5)] + [Copy(4, TEXT, 2)]
    d = decide(
        rows,
        torch.tensor([0.9]),
        N,
        grand_threshold=3.0,
        orig_norms=torch.tensor([1.0, 1.1, 0.9, 1.0, 10.0]),
    )
    assert d.pruned.tolist() == [False, False, False, False, True]
    assert d.weights.tolist()[4:] == [0.0, 0.0] and bool((d.weights[:4] > 0).all())
    with pytest.raises(ValueError, match="GraNd"):
        decide(rows, torch.tensor([0.9]), N, grand_threshold=3.0)


def test_cosine_count_mismatch() -> None:
    with pytest.raises(ValueError, match="cosines"):
        decide(ROWS, torch.tensor([0.5]), N)
