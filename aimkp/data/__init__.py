"""MKP data: the :class:`Record` type, streaming readers, datasets, synthetic data, corruptions.

>>> from aimkp.data import load_dataset
>>> train = load_dataset("default", "train")      # committed openclipart subset
>>> train.stats.summary()                           # how many read / skipped and why
>>> toy = load_dataset("synthetic:3", "test")       # procedural data with known ground truth

``spec`` for :func:`load_dataset`:

- ``"default"`` (alias ``"openclipart"``): the committed subset under
  ``aimkp/datasets/openclipart``.
- ``"synthetic"`` or ``"synthetic:SEED"``: :func:`aimkp.data.synthetic.generate`, split sizes
  ``SYNTHETIC_SIZES``, a different stream per split.
- ``"synthetic-split[:SEED[:P]]"``: the same posts with one text-only and one image-only keyphrase
  each (``modal_split=True``); with ``P`` a shortcut tag word that names the post's shape with
  probability ``P`` on train and is random on valid / test (:mod:`aimkp.data.synthetic`).
- a file (``.jsonl``, ``.json``, CMKP ``.txt``): read as is (``split`` is ignored).
- a directory holding ``{split}.jsonl`` / ``{split}.json`` / ``{split}.txt`` (or ``{split}_src.txt``
  as in the CMKP release).
- ``"hf:DIR"``: a Hugging Face ``Dataset`` / ``DatasetDict`` saved with ``save_to_disk``
  (:mod:`aimkp.data.hf`; ``valid`` is its ``validation`` split). :func:`from_hf` / :func:`to_hf`
  convert between records and ``datasets.Dataset`` in Python.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from aimkp.errors import DataError

from .hf import from_hf, to_hf
from .readers import (
    iter_records,
    normalize_keyphrase,
    read_records,
    split_keyphrases,
    write_jsonl,
)
from .record import ReadStats, Record, RecordList

__all__ = [
    "Record",
    "ReadStats",
    "RecordList",
    "iter_records",
    "read_records",
    "load_dataset",
    "from_hf",
    "to_hf",
    "write_jsonl",
    "normalize_keyphrase",
    "split_keyphrases",
    "default_dataset_dir",
    "SPLITS",
    "SYNTHETIC_SIZES",
]

logger = logging.getLogger("aimkp.data")

SPLITS = ("train", "valid", "test")
SYNTHETIC_SIZES = {"train": 1024, "valid": 128, "test": 128}
_SPLIT_SEED_OFFSET = {"train": 0, "valid": 1_000_003, "test": 2_000_003}


def default_dataset_dir() -> Path:
    """The directory of the committed default dataset (``aimkp/datasets/openclipart``)."""
    return Path(__file__).resolve().parents[1] / "datasets" / "openclipart"


def _split_file(directory: Path, split: str) -> Path:
    cands = [directory / f"{split}{ext}" for ext in (".jsonl", ".json", ".txt")]
    cands.append(directory / f"{split}_src.txt")
    for c in cands:
        if c.is_file():
            return c
    raise DataError(
        f"{directory}: no file for split {split!r} (looked for {', '.join(c.name for c in cands)})"
    )


def _synthetic_args(spec: str, split_modal: bool, rest: str) -> tuple[int, float | None]:
    """``SEED`` (and, for synthetic-split, ``SEED:P``) of a synthetic spec -> (seed, shortcut)."""
    parts = rest.split(":") if rest else []
    if len(parts) > (2 if split_modal else 1):
        form = "synthetic-split[:SEED[:P]]" if split_modal else "synthetic[:SEED]"
        raise DataError(f"dataset spec {spec!r}: expected {form}")
    try:
        seed = int(parts[0]) if parts and parts[0] else 0
    except ValueError:
        raise DataError(f"synthetic spec {spec!r}: seed must be an integer") from None
    if len(parts) < 2:
        return seed, None
    try:
        p = float(parts[1])
    except ValueError:
        p = -1.0
    if not 0.0 <= p <= 1.0:
        raise DataError(f"synthetic spec {spec!r}: the shortcut P must be a number in [0, 1]")
    return seed, p


def _synthetic(
    spec: str, split_modal: bool, rest: str, split: str, kwargs: dict[str, Any]
) -> RecordList:
    from . import synthetic

    seed, shortcut = _synthetic_args(spec, split_modal, rest)
    if shortcut is not None and split != "train":
        shortcut = 0.0  # the tag word is random outside train: the shortcut does not transfer
    n = int(kwargs.pop("n", SYNTHETIC_SIZES[split]))
    size = int(kwargs.pop("image_size", 64))
    if kwargs:
        raise DataError(f"synthetic data takes n= and image_size= only, got {sorted(kwargs)}")
    recs = synthetic.generate(
        n,
        seed + _SPLIT_SEED_OFFSET[split],
        size,
        id_prefix=split,
        modal_split=split_modal,
        shortcut=shortcut,
    )
    return RecordList(recs, ReadStats(source=spec, read=len(recs)))


def load_dataset(spec: str, split: str = "train", **kwargs: Any) -> RecordList:
    """Load one split of a dataset as a :class:`RecordList` (a ``list[Record]`` with ``.stats``).

    Args:
        spec: ``"default"``, ``"synthetic[:seed]"``, a data file, a directory or ``"hf:DIR"``
            (module docstring).
        split: ``"train"``, ``"valid"`` or ``"test"`` (ignored for a single file).
        **kwargs: the reader options of :func:`iter_records` and :func:`from_hf`
            (:class:`~aimkp.data.options.ReadOptions`: ``image_dir``, ``on_missing_image``,
            ``on_bad_record``, ``with_images``, ``check_images``) or, for synthetic, ``n`` and
            ``image_size``.
    """
    if not isinstance(spec, str) or not spec:
        raise DataError(f"dataset spec must be a non-empty string, got {spec!r}")
    if spec in ("default", "openclipart"):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        path = _split_file(default_dataset_dir(), split)
        return read_records(path, **kwargs)
    kind, _, rest = spec.partition(":")
    if kind in ("synthetic", "synthetic-split"):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        return _synthetic(spec, kind == "synthetic-split", rest, split, kwargs)
    if spec.startswith("hf:"):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        return from_hf(spec[3:], split, **kwargs)
    p = Path(os.path.expanduser(spec))
    if p.is_dir():
        return read_records(_split_file(p, split), **kwargs)
    if p.is_file():
        return read_records(p, **kwargs)
    raise DataError(
        f"dataset spec {spec!r} is not 'default', 'synthetic[:seed]', a data file, a directory "
        "or hf:DIR"
    )
