"""Shared test set-up.

Triton kernels run on the CPU through the interpreter when no CUDA device is present: the variable
must be set before triton is first imported, so it is set here, at collection time. Every test
module runs single-threaded (:func:`_one_thread`); ``taps`` holds the step's taps a test registers
(:mod:`aimkp.spans`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator

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


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from intra-op threads, and when the 2 cores are shared with
    other test processes the OpenMP barriers cost 10-40x (measured 11.5 s vs 0.3 s for 8 tiny
    forwards). Every module runs single-threaded; the thread count is restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def taps() -> Iterator[contextlib.ExitStack]:
    """An exit stack closed after the test: the taps a test registers on it
    (``stack.enter_context(aimkp.spans.tapping(...))``) end with the test."""
    with contextlib.ExitStack() as stack:
        yield stack
