"""Fused ops with explicit backends (``"auto"|"triton"|"cpp"|"cuda"|"reference"``).

``last_backend(op)`` tells which backend the last call of ``op`` ran on.
"""

from __future__ import annotations

from aimkp.ops._registry import last_backend, record_backend, reset_backends
from aimkp.ops.masked_embedding import (
    CompactEmbedding,
    MaskedEmbedding,
    masked_embedding,
    replace_input_embedding,
)
from aimkp.ops.masked_embedding_ref import masked_embedding_reference

__all__ = [
    "CompactEmbedding",
    "MaskedEmbedding",
    "last_backend",
    "masked_embedding",
    "masked_embedding_reference",
    "record_backend",
    "replace_input_embedding",
    "reset_backends",
]
