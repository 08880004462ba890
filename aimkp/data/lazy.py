"""Posts read one at a time with where each came from: the input of ``aimkp predict``.

>>> stats = ReadStats()
>>> for post in iter_posts("posts.jsonl", "test", stats=stats):
...     post.where, post.record.id          # ("posts.jsonl:7", "p7")

:func:`aimkp.data.load_dataset` returns a list (training shuffles and revisits it); a collection
to tag can be far larger than memory, so :func:`iter_posts` reads the same specs (a file, a
directory, ``default``, ``hf:DIR``, ``synthetic``) lazily, one record at a time, with the reader
options of :func:`aimkp.data.iter_records`. Each :class:`Post` carries its location (``file:line``,
``file:line: record N`` for AimKP JSON, ``DIR: split 'test', row N`` for ``hf:``) so that a post
rejected later (too long for the model) is reported where it is. ``labelled=False`` (the default
here) also accepts posts without keyphrases: posts to tag need none.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from typing_extensions import Unpack

from aimkp.data import SPLITS, _split_file, default_dataset_dir, load_dataset
from aimkp.errors import DataError

from . import hf
from .options import ReadKwargs, ReadOptions, is_synthetic
from .readers import (
    _BadRecords,
    _ImageResolver,
    _located_records,
    detect_format,
)
from .record import ReadStats, Record


class Post(NamedTuple):
    """One record and where it was read (``file:line``)."""

    where: str
    record: Record


def iter_posts(
    spec: str,
    split: str = "test",
    *,
    labelled: bool = False,
    stats: ReadStats | None = None,
    **options: Unpack[ReadKwargs],
) -> Iterator[Post]:
    """Stream the posts of ``spec`` (as :func:`aimkp.data.load_dataset` takes it) one at a time.

    Skipped records (bad ones with ``on_bad_record="skip"``, missing images with
    ``on_missing_image="skip"``, blank lines) are counted in ``stats`` with their locations, as
    the list readers do. The spec, the file and the options are checked when this is called."""
    st = stats if stats is not None else ReadStats()
    if not isinstance(spec, str) or not spec:
        raise DataError(f"dataset spec must be a non-empty string, got {spec!r}")
    if is_synthetic(spec):
        return _generated(spec, split, st)
    opts = ReadOptions(**options)
    if spec.startswith("hf:"):
        return _hf_posts(spec[3:], split, st, opts, labelled)
    return _file_posts(_data_file(spec, split), st, opts, labelled)


def _data_file(spec: str, split: str) -> Path:
    if spec in ("default", "openclipart"):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        return _split_file(default_dataset_dir(), split)
    p = Path(os.path.expanduser(spec))
    if p.is_dir():
        return _split_file(p, split)
    if p.is_file():
        return p
    raise DataError(
        f"dataset spec {spec!r} is not 'default', 'synthetic[:seed]', a data file, a directory "
        "or hf:DIR"
    )


def _generated(spec: str, split: str, st: ReadStats) -> Iterator[Post]:
    recs = load_dataset(spec, split)  # procedural and small: generated whole
    st.source, st.read = f"{spec}[{split}]", len(recs)
    return (Post(f"{spec}[{split}] #{i}", r) for i, r in enumerate(recs))


def _file_posts(path: Path, st: ReadStats, opts: ReadOptions, labelled: bool) -> Iterator[Post]:
    fmt = detect_format(path)  # "cmkp", "aimkp_json" or "jsonl"; a DataError otherwise
    st.source = os.fspath(path)
    res, bad = _ImageResolver(path, opts), _BadRecords(opts, st)
    located = _located_records(path, fmt, res, bad, st, labelled)
    return (Post(where, rec) for where, rec in located)


def _hf_posts(
    directory: str, split: str, st: ReadStats, opts: ReadOptions, labelled: bool
) -> Iterator[Post]:
    """Rows of a ``save_to_disk`` dataset, read in batches by ``datasets`` (memory-mapped)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    located = hf._located_rows(directory, split, opts, st, labelled)
    return (Post(where, rec) for where, rec in located)
