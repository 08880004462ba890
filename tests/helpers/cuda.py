"""The CUDA skip marker the tests share, and output poisoning for kernels' fresh buffers."""

from __future__ import annotations

import pytest
import torch

CUDA_REASON = "needs a CUDA device"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a freshly allocated output with NaN (or the dtype's max for integers) in place."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)
