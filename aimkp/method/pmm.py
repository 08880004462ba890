"""Progressive Modality Masking (PMM): per-sample stride tables and keep-mask builders.

Every training sample i has a text stride g_T[i] and an image stride g_V[i], both 1 at start.
A visit with |g| > 1 trains on a masked copy of that modality. After each visit:

- g == 1 (first visit, no copy): g becomes 2;
- g > 1 (copy present, not frozen): passed the gradient filter -> 2 g; failed -> max(2, g // 2)
  and frozen, stored as the NEGATIVE number -max(2, g // 2);
- g < 0 (frozen): the copy is still built with stride |g|; the value never changes again.

Masking keeps, of the n text tokens, offsets g-1, 2g-1, ... (only the last one when g > n); of the
h x w image-token grid, rows g-1::g and columns g-1::g (only the last token when g > h or g > w).

Example (text n = 5, image grid 4 x 4)::

    >>> text_keep_offsets(5, 2).tolist()
    [1, 3]
    >>> image_keep_offsets(4, 4, 2).tolist()      # rows 1, 3 x cols 1, 3
    [5, 7, 13, 15]
    >>> image_keep_offsets(4, 4, 8).tolist()      # g beyond the grid: the last token
    [15]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

TEXT = "text"
IMAGE = "image"


def text_keep_offsets(n: int, g: int) -> torch.Tensor:
    """Offsets (LongTensor [k]) of the text tokens a text-masked copy keeps; n tokens, stride g."""
    g = abs(int(g))
    if n < 0:
        raise ValueError(f"text length must be >= 0, got {n}")
    if g < 1:
        raise ValueError(f"stride must be non-zero, got {g}")
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if g > n:
        return torch.tensor([n - 1], dtype=torch.long)
    return torch.arange(g - 1, n, g, dtype=torch.long)


def image_keep_offsets(h: int, w: int, g: int) -> torch.Tensor:
    """Flat offsets (LongTensor [k], row-major in the h x w grid) an image-masked copy keeps."""
    g = abs(int(g))
    if h < 1 or w < 1:
        raise ValueError(f"image grid must be at least 1 x 1, got {h} x {w}")
    if g < 1:
        raise ValueError(f"stride must be non-zero, got {g}")
    if g > h or g > w:
        return torch.tensor([h * w - 1], dtype=torch.long)
    rows = torch.arange(g - 1, h, g, dtype=torch.long)
    cols = torch.arange(g - 1, w, g, dtype=torch.long)
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


def _span(sample: Any, name: str) -> tuple[int, int] | None:
    span = getattr(sample, name, None)
    if span is None:
        return None
    s, e = int(span[0]), int(span[1])
    return (s, e) if e > s else None


def _required_span(sample: Any, name: str, what: str) -> tuple[int, int]:
    """``sample.<name>`` as ``(s, e)``; ValueError "<text|image> copy requested for <what>" when
    the span is empty."""
    span = _span(sample, name)
    if span is None:
        raise ValueError(f"{name.split('_')[0]} copy requested for {what}")
    return span


def has_text(sample: Any) -> bool:
    """Whether the encoded sample has a non-empty text span (so a text copy can exist)."""
    return _span(sample, "text_span") is not None


def has_image(sample: Any) -> bool:
    """Whether the encoded sample has image tokens (so an image copy can exist)."""
    return _span(sample, "image_span") is not None


def build_keep(sample: Any, kind: str | None, g: int = 1) -> torch.Tensor:
    """Keep mask BoolTensor [T] of one copy of an encoded sample.

    ``kind`` None is the original (all True); "text" hides the text span except the kept offsets;
    "image" hides the image span except the kept grid cells. The instruction and the answer are
    never hidden. ``sample`` needs ``input_ids [T]``, ``text_span (s, e)``, ``image_span (s, e)``
    and ``grid (h, w)`` with ``h * w == e - s`` for the image span.
    """
    T = int(sample.input_ids.shape[-1])
    keep = torch.ones(T, dtype=torch.bool)
    if kind is None:
        return keep
    if kind == TEXT:
        s, e = _required_span(sample, "text_span", "a sample with an empty text span")
        keep[s:e] = False
        keep[s + text_keep_offsets(e - s, g)] = True
        return keep
    if kind == IMAGE:
        s, e = _required_span(sample, "image_span", "a sample without image tokens")
        h, w = (int(x) for x in sample.grid)
        if h * w != e - s:
            raise ValueError(f"image grid {h}x{w} does not match the image span length {e - s}")
        keep[s:e] = False
        keep[s + image_keep_offsets(h, w, g)] = True
        return keep
    raise ValueError(f"unknown copy kind {kind!r} (expected None, 'text' or 'image')")


@dataclass
class Copy:
    """One row of a step: copy ``kind`` (None = original) of batch sample ``sample`` at stride g."""

    sample: int
    kind: str | None
    stride: int


class StrideTable:
    """Text and image strides of every training sample (LongTensor [N] each; negative = frozen)."""

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"number of samples must be >= 0, got {n}")
        self.text = torch.ones(n, dtype=torch.long)
        self.image = torch.ones(n, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.text.numel())

    def copies(self, index: int, sample: Any, batch_pos: int) -> list[Copy]:
        """The rows of one visit of dataset sample ``index`` (original, then text, then image)."""
        out = [Copy(batch_pos, None, 1)]
        gt, gv = int(self.text[index]), int(self.image[index])
        if abs(gt) > 1 and has_text(sample):
            out.append(Copy(batch_pos, TEXT, abs(gt)))
        if abs(gv) > 1 and has_image(sample):
            out.append(Copy(batch_pos, IMAGE, abs(gv)))
        return out

    @staticmethod
    def _next(g: int, passed: bool | None) -> int:
        if g < 0:
            return g
        if g == 1:
            return 2
        if passed is None:  # no copy of this modality could be built (e.g. no image)
            return g
        return 2 * g if passed else -max(2, g // 2)

    def update(self, index: int, text_passed: bool | None, image_passed: bool | None) -> None:
        """Apply one visit's filter outcomes (None: that modality had no copy this visit)."""
        self.text[index] = self._next(int(self.text[index]), text_passed)
        self.image[index] = self._next(int(self.image[index]), image_passed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"text": self.text.clone(), "image": self.image.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        text, image = state["text"], state["image"]
        if text.shape != self.text.shape or image.shape != self.image.shape:
            raise ValueError(
                f"stride table of {text.numel()} samples does not match the {len(self)} "
                "training samples of this run"
            )
        self.text = text.clone().long()
        self.image = image.clone().long()

    def summary(self) -> dict[str, float]:
        """Mean |stride| and frozen fractions, for logs."""
        n = max(1, len(self))
        return {
            "text_stride_mean": float(self.text.abs().float().mean()) if len(self) else 0.0,
            "image_stride_mean": float(self.image.abs().float().mean()) if len(self) else 0.0,
            "text_frozen": float((self.text < 0).sum()) / n,
            "image_frozen": float((self.image < 0).sum()) / n,
        }

    def reconcile(self) -> None:
        """Reconcile with the other ranks when torch.distributed is initialised (else no-op)."""
        self.text = reconcile_distributed(self.text)
        self.image = reconcile_distributed(self.image)


def reconcile_strides(tables: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Merge stride tables of several ranks ``[W, N]`` -> ``[N]``.

    A frozen value (negative) on any rank wins: the smallest stored value; otherwise the largest.
    """
    t = torch.stack(list(tables)) if not isinstance(tables, torch.Tensor) else tables
    if t.dim() != 2:
        raise ValueError(f"expected stacked tables [W, N], got shape {tuple(t.shape)}")
    return torch.where((t < 0).any(0), t.min(0).values, t.max(0).values)


def reconcile_distributed(table: torch.Tensor) -> torch.Tensor:
    """:func:`reconcile_strides` across the ranks of the default process group (all_gather)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return table
    dev = table.device
    if dist.get_backend() == "nccl":  # NCCL moves CUDA tensors only
        dev = torch.device("cuda", torch.cuda.current_device())
    local = table.to(dev)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return reconcile_strides(gathered).to(table.device)
