"""The reader options: one definition of the keywords every reader takes, and the options a
command passes to :func:`aimkp.data.load_dataset` for a dataset spec.

>>> iter_records("posts.jsonl", image_dir="images", on_missing_image="skip")
>>> ReadOptions(on_bad_record="skip").check_images      # True: the defaults live here

:func:`aimkp.data.iter_records`, :func:`aimkp.data.read_records`, :func:`aimkp.data.from_hf`,
:func:`aimkp.data.lazy.iter_posts` and :func:`aimkp.data.load_dataset` take these as keywords
(typed by :class:`ReadKwargs`) and read them through one :class:`ReadOptions`, which holds the
defaults and rejects a bad value, so an option added here is taken by every reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypedDict

from typing_extensions import Unpack

from aimkp.errors import DataError

ON_MISSING_IMAGE = ("error", "skip")
ON_BAD_RECORD = ("error", "skip")


class ReadKwargs(TypedDict, total=False):
    """The fields of :class:`ReadOptions` as keyword arguments (``**options: Unpack[ReadKwargs]``,
    so that mypy checks each caller's keywords)."""

    image_dir: str | os.PathLike[str] | None
    on_missing_image: str
    on_bad_record: str
    with_images: bool
    check_images: bool


@dataclass(frozen=True)
class ReadOptions:
    """How a reader treats images and malformed records.

    Attributes:
        image_dir: where images live; a URL or bare file name is looked up there by its file
            name. None: paths are relative to the data file's (or dataset's) directory.
        on_missing_image: ``"error"`` raises on a missing or unreadable image; ``"skip"`` skips
            the record and counts it in the reader's :class:`~aimkp.data.ReadStats`.
        on_bad_record: ``"error"`` raises :class:`~aimkp.errors.DataError` on a malformed record;
            ``"skip"`` logs it (file:line and reason), counts it as ``"bad record"`` and reads on.
        with_images: False ignores the image field entirely (``image_path=None``), e.g. scoring.
        check_images: decode each image in full to catch unreadable or truncated files early.
    """

    image_dir: str | os.PathLike[str] | None = None
    on_missing_image: str = "error"
    on_bad_record: str = "error"
    with_images: bool = True
    check_images: bool = True

    def __post_init__(self) -> None:
        if self.on_missing_image not in ON_MISSING_IMAGE:
            raise DataError(
                f"on_missing_image must be 'error' or 'skip', got {self.on_missing_image!r}"
            )
        if self.on_bad_record not in ON_BAD_RECORD:
            raise DataError(
                f"on_bad_record must be one of {ON_BAD_RECORD}, got {self.on_bad_record!r}"
            )


def is_synthetic(spec: str) -> bool:
    """True for ``synthetic[:SEED]`` / ``synthetic-split[:SEED[:P]]`` (generated, no files)."""
    return spec.partition(":")[0] in ("synthetic", "synthetic-split")


def reader_options(spec: str, **options: Unpack[ReadKwargs]) -> ReadKwargs:
    """The reader keywords of :func:`aimkp.data.load_dataset` for ``spec``: ``options`` as they
    are, or none for synthetic data, which reads no file."""
    return ReadKwargs() if is_synthetic(spec) else options
