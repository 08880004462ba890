"""Loader of the compiled extension ``aimkp._C`` (pybind11, no libtorch).

The extension takes raw data pointers (``tensor.data_ptr()``), sizes, row strides, dtype codes and,
for CUDA launchers, the current stream as an integer. :func:`load_ext` imports it once and gives a
clear message when it is missing (typically: the package was not built, or was built elsewhere).
"""

from __future__ import annotations

from types import ModuleType

import torch

#: dtype codes shared with csrc/common.h (``enum DType``).
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


_EXT: ModuleType | None = None


def load_ext() -> ModuleType:
    """Import and return ``aimkp._C``; raise ImportError with build instructions when missing."""
    global _EXT
    if _EXT is not None:  # a plain global, not lru_cache: torch.compile traces through this
        return _EXT
    try:
        from aimkp import _C
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise ImportError(
            "aimkp._C (the C++/CUDA extension) is not available: "
            f"{exc}. Build it with `pip install --no-build-isolation -e .` in the aimkp checkout "
            "(a C++17 compiler with OpenMP is needed; nvcc is optional), or use "
            "backend='triton' / backend='reference'."
        ) from exc
    _EXT = _C
    return _C


def ext_available() -> bool:
    """True when ``aimkp._C`` can be imported."""
    try:
        load_ext()
    except ImportError:
        return False
    return True


def has_cuda_kernels() -> bool:
    """True when ``aimkp._C`` was built with its CUDA kernels (nvcc found at build time)."""
    return ext_available() and bool(load_ext().has_cuda())


def dtype_code(dtype: torch.dtype) -> int:
    """The extension's code for ``dtype``; ValueError for dtypes the kernels do not handle."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype} is not supported by the aimkp kernels (float32, float16, bfloat16); "
            "use backend='reference' for other dtypes"
        ) from None
