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

from aimkp.data.images import open_image, to_rgb
from aimkp.errors import DataError

if TYPE_CHECKING:  # PIL is imported lazily: reading text and scoring never need it
    from PIL import Image


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
        source: where a reader read it (``posts.jsonl:7``, ``data.json: record 3``), named by
            errors found later (a post too long for the model); None for records made in code.
    """

    id: str
    text: str
    keyphrases: list[str]
    image_path: str | None = None
    image: Image.Image | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)

    @property
    def where(self) -> str:
        """``source`` for messages, else the record's id."""
        return self.source or f"record {self.id!r}"

    def load_image(self) -> Image.Image | None:
        """Return the image as an RGB ``PIL.Image.Image`` ([H, W, 3] uint8), or ``None``.

        Decoded by :func:`aimkp.data.images.to_rgb`: 16-bit and float grayscale scaled (not
        clipped to white), transparent images composited on white, EXIF orientation applied,
        the first frame of an animation.

        Raises:
            ValueError: the image file is missing or cannot be decoded (names the file and the
                record id).
        """
        if self.image is not None:
            try:
                return to_rgb(self.image)
            except (DataError, OSError, SyntaxError) as exc:  # a lazily decoded image (hf bytes)
                raise DataError(f"record {self.id!r}: cannot decode its image: {exc}") from None
        if self.image_path is None:
            return None
        try:
            return open_image(self.image_path)
        except DataError as exc:
            raise DataError(f"record {self.id!r}: {exc}") from None

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
    # where each post id was first read (ids are unique within a file: scores pair by them)
    first_seen: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def check_unique_id(self, rid: str, where: str) -> None:
        """DataError naming both places when ``rid`` was read before."""
        first = self.first_seen.setdefault(rid, where)
        if first != where:
            raise DataError(f"{where}: duplicate post id {rid!r} (first at {first})")

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
