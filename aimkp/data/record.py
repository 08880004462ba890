"""The one record type every part of aimkp exchanges, and the read statistics readers report.

A :class:`Record` is one post: its text, its gold (or predicted) keyphrases and optionally an
image, either on disk (``image_path``) or in memory (``image``, used by the corrupted suites; it
wins over ``image_path``).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aimkp.errors import DataError

if TYPE_CHECKING:  # PIL is imported lazily: reading text and scoring never need it
    from PIL import Image


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        from PIL import Image

        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


@dataclass
class Record:
    """One multimodal post.

    Attributes:
        id: identifier, unique within a split.
        text: the post's text (may be empty for image-only posts).
        keyphrases: ranked / gold keyphrases, word-segmented lower-case phrases
            (``"wildflower hour"``).
        image_path: path to the image file, or ``None``.
        image: an in-memory ``PIL.Image.Image``; wins over ``image_path`` when set.
        meta: free-form extra fields a reader keeps (e.g. ``{"image_url": ...}``); never used by
            scoring.
    """

    id: str
    text: str
    keyphrases: list[str]
    image_path: str | None = None
    image: Image.Image | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image | None:
        """Return the image as an RGB ``PIL.Image.Image`` ([H, W, 3] uint8), or ``None``.

        Transparent images (RGBA, LA, palette with transparency) are composited on white.

        Raises:
            ValueError: the image file is missing or cannot be decoded (names the file and the
                record id).
        """
        if self.image is not None:
            return _to_rgb(self.image)
        if self.image_path is None:
            return None
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.image_path) as im:
                rgb = _to_rgb(im)
                return im.copy() if rgb is im else rgb  # decode before the file closes
        except FileNotFoundError as exc:
            raise DataError(f"record {self.id!r}: image not found: {self.image_path}") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"record {self.id!r}: cannot read image {self.image_path}: {exc}"
            ) from exc

    @property
    def has_image(self) -> bool:
        """True when the record carries an image (in memory or on disk)."""
        return self.image is not None or self.image_path is not None

    def replace(self, **changes: Any) -> Record:
        """A shallow copy with ``changes`` applied (keyphrases and meta are copied, not shared)."""
        changes.setdefault("keyphrases", list(self.keyphrases))
        changes.setdefault("meta", dict(self.meta))
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The generic JSONL form ``{id, image, text, keyphrases}`` (in-memory images are lost)."""
        return {
            "id": self.id,
            "image": self.image_path,
            "text": self.text,
            "keyphrases": list(self.keyphrases),
        }


@dataclass
class ReadStats:
    """What a reader read and what it skipped, by reason.

    ``read`` counts records returned; ``skipped`` maps a reason (``"missing image"``,
    ``"blank line"``, ...) to a count; ``examples`` keeps the first few locations per reason.
    """

    source: str = ""
    read: int = 0
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        """Count one skipped item and remember where it was (first 5 per reason)."""
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(where)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: ReadStats) -> None:
        """Add another reader's counts into this one."""
        self.read += other.read
        self.skipped.update(other.skipped)
        for reason, ex in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ex[: max(0, 5 - len(mine))])

    def summary(self) -> str:
        """One line: ``"<src>: read 120 records, skipped 3 (missing image: 3 [a.txt:4, ...])"``."""
        name = os.fspath(self.source) if self.source else "input"
        if not self.skipped:
            return f"{name}: read {self.read} records, skipped 0"
        parts = [
            f"{reason}: {n} [{', '.join(self.examples.get(reason, []))}]"
            for reason, n in sorted(self.skipped.items())
        ]
        return (
            f"{name}: read {self.read} records, skipped {self.total_skipped} ({'; '.join(parts)})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "source": os.fspath(self.source),
            "read": self.read,
            "skipped": dict(self.skipped),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }


class RecordList(list):
    """A ``list[Record]`` that also carries the :class:`ReadStats` of the read that made it."""

    def __init__(self, records: Any = (), stats: ReadStats | None = None) -> None:
        super().__init__(records)
        self.stats = stats if stats is not None else ReadStats(read=len(self))
