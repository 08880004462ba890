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


def load_dataset(spec: str, split: str = "train", **kwargs: Any) -> RecordList:
    """Load one split of a dataset as a :class:`RecordList` (a ``list[Record]`` with ``.stats``).

    Args:
        spec: ``"default"``, ``"synthetic[:seed]"``, a data file, a directory or ``"hf:DIR"``
            (module docstring).
        split: ``"train"``, ``"valid"`` or ``"test"`` (ignored for a single file).
        **kwargs: passed to :func:`iter_records` (``image_dir``, ``on_missing_image``,
            ``with_images``, ``check_images``) or, for synthetic, ``n`` and ``image_size``.
    """
    if not isinstance(spec, str) or not spec:
        raise DataError(f"dataset spec must be a non-empty string, got {spec!r}")
    if spec in ("default", "openclipart"):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        path = _split_file(default_dataset_dir(), split)
        return read_records(path, **kwargs)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from . import synthetic

        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        seed_txt = spec.partition(":")[2] or "0"
        try:
            seed = int(seed_txt)
        except ValueError:
            raise DataError(f"synthetic spec {spec!r}: seed must be an integer") from None
        n = int(kwargs.pop("n", SYNTHETIC_SIZES[split]))
        size = int(kwargs.pop("image_size", 64))
        if kwargs:
            raise DataError(f"synthetic data takes n= and image_size= only, got {sorted(kwargs)}")
        recs = synthetic.generate(n, seed + _SPLIT_SEED_OFFSET[split], size, id_prefix=split)
        return RecordList(recs, ReadStats(source=spec, read=len(recs)))
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
