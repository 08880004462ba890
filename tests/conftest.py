"""Shared test set-up.

Triton kernels run on the CPU through the interpreter when no CUDA device is present: the variable
must be set before triton is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from tests.helpers.cuda import CUDA_REASON

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests skipped for want of CUDA also carry the ``requires_cuda`` marker, so that
    ``pytest -m requires_cuda`` (``make gpu-check``) selects exactly them."""
    for item in items:
        if any(m.kwargs.get("reason") == CUDA_REASON for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.requires_cuda)


@pytest.fixture
def shared_dir() -> pathlib.Path:
    """``../shared`` beside the checkout; tests that need it skip cleanly when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside this checkout")
    return SHARED


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
