"""Hugging Face ``datasets`` in and out: ``--data hf:DIR``, :func:`from_hf`, :func:`to_hf`.

>>> ds = to_hf(load_dataset("default", "test"))      # datasets.Dataset, images embedded
>>> DatasetDict({"test": ds}).save_to_disk("data/mkp_hf")
>>> recs = from_hf("data/mkp_hf", "test")            # == load_dataset("hf:data/mkp_hf", "test")

Columns: ``image`` (a ``datasets.Image`` feature, or a path string relative to the dataset
directory / ``image_dir``, or null), ``text`` (string or null), ``keyphrases`` (a list of strings,
or one string with ``;`` / ``,`` separators), optional ``id`` (default: the row index); any other
column is kept in ``Record.meta``. A ``DatasetDict`` has splits ``train``, ``validation`` (or
``valid``) and ``test``; a single ``Dataset`` serves every split, as a single data file does.

Images are not decoded when read: an embedded image becomes a lazily decoded PIL image over its
bytes (the header is checked), a path an ``image_path``. ``datasets`` is imported only here, when
used. A bad row raises ``ValueError`` naming the dataset directory, the split and the row index.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from typing_extensions import Unpack

from aimkp.data.images import path_problem, unreadable_reason
from aimkp.errors import DataError

from .options import ReadKwargs, ReadOptions
from .readers import (
    ImageError,
    _BadRecords,
    _parsed,
    normalize_keyphrase,
    split_keyphrases,
)
from .record import ReadStats, Record, RecordList

logger = logging.getLogger("aimkp.data")

COLUMNS = ("id", "image", "text", "keyphrases")
SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid"), "test": ("test",)}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"Hugging Face datasets need the datasets package (pip install 'aimkp[data]'): {exc}"
        ) from None
    return datasets


def _load_from_disk(path: Path) -> Any:
    if not path.is_dir():
        raise DataError(f"{path}: no such dataset directory (hf:DIR takes a save_to_disk dir)")
    try:
        return _datasets().load_from_disk(str(path))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({msg})") from None


def _pick_split(ds: Any, split: str, where: str) -> tuple[Any, str]:
    """The split of a DatasetDict (``valid`` also as ``validation``), or a Dataset as it is."""
    if not isinstance(ds, _datasets().DatasetDict):
        return ds, split
    for name in SPLIT_NAMES.get(split, (split,)):
        if name in ds:
            return ds[name], name
    raise DataError(f"{where}: no split {split!r} (the dataset has {', '.join(sorted(ds))})")


def _check_columns(ds: Any, where: str, labelled: bool) -> None:
    """The columns a split needs: ``text`` and, for labelled records, ``keyphrases``."""
    needed = ("text", "keyphrases") if labelled else ("text",)
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)} (has {', '.join(ds.column_names)})"
        )


def _keyphrases(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        kps = split_keyphrases(value)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        kps = [p for p in (normalize_keyphrase(v) for v in value) if p]
    else:
        raise DataError(f"{where}: 'keyphrases' must be a list of strings or a string")
    if not kps:
        raise DataError(f"{where}: empty keyphrase list")
    return kps


class _Images:
    """Turns an ``image`` cell into ``(keep, image, image_path)``; a path string is relative to
    ``base``."""

    def __init__(self, base: Path, opts: ReadOptions) -> None:
        self.base, self.on_missing = base, opts.on_missing_image
        self.with_images, self.check = opts.with_images, opts.check_images

    def __call__(self, value: Any, where: str, stats: ReadStats) -> tuple[bool, Any, str | None]:
        if not self.with_images or value is None or value == "":
            return True, None, None
        if isinstance(value, dict) and value.get("bytes"):
            return self._from_bytes(value["bytes"], where, stats)
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, str) or not path:
            raise DataError(
                f"{where}: 'image' must be a datasets.Image, a path string or null, "
                f"got {type(value).__name__}"
            )
        cand = Path(path) if os.path.isabs(path) else self.base / path
        reason = None if cand.is_file() else path_problem(cand)
        if reason is None and self.check:
            reason = unreadable_reason(cand)
        if reason is None:
            return True, None, os.fspath(cand)
        return self._bad(reason, f"{reason}: {cand}", where, stats)

    def _from_bytes(self, data: bytes, where: str, stats: ReadStats) -> tuple[bool, Any, None]:
        from PIL import Image, UnidentifiedImageError

        try:
            im = Image.open(io.BytesIO(data))  # lazy: reads the header, decodes on first use
        except (UnidentifiedImageError, OSError):
            return self._bad("unreadable image", "unreadable image bytes", where, stats)
        return True, im, None

    def _bad(self, reason: str, what: str, where: str, stats: ReadStats) -> tuple[bool, None, None]:
        if self.on_missing == "skip":
            stats.skip(reason, where)
            return False, None, None
        raise ImageError(f"{where}: {what} (on_missing_image='skip' skips and counts such rows)")


def _rows(ds: Any, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Rows of ``ds`` with images undecoded (``{"bytes", "path"}``), read in batches."""
    datasets = _datasets()
    if isinstance(ds.features.get("image"), datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    for batch in ds.iter(batch_size=batch_size):
        cols = list(batch)
        for values in zip(*(batch[c] for c in cols)):
            yield dict(zip(cols, values))


def _record(
    row: dict[str, Any],
    index: int,
    where: str,
    images: _Images,
    stats: ReadStats,
    labelled: bool = True,
):
    """``labelled=False`` (posts to tag): the keyphrases may be absent, null or empty."""
    text = row.get("text")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string or null, got {type(text).__name__}")
    value = row.get("keyphrases")
    kps = _keyphrases(value, where) if labelled or value else []
    keep, image, path = images(row.get("image"), where, stats)
    if not keep:
        return None
    rid = row.get("id")
    meta = {k: v for k, v in row.items() if k not in COLUMNS}
    return Record(
        id=str(index if rid is None else rid),
        text=text.strip(),
        keyphrases=kps,
        image_path=path,
        image=image,
        meta=meta,
        source=where,
    )


def from_hf(
    dataset_or_path: Any, split: str = "train", **options: Unpack[ReadKwargs]
) -> RecordList:
    """Records of one split of a ``datasets.Dataset`` / ``DatasetDict`` or of a directory saved
    with ``save_to_disk``; see the module docstring for columns and splits.

    Args:
        dataset_or_path: a Dataset, a DatasetDict or the directory.
        split: ``train``, ``valid`` (``validation`` in the DatasetDict) or ``test``.
        **options: the reader options (:class:`~aimkp.data.options.ReadOptions`). Here
            ``image_dir`` is the base of relative image path strings (default: the dataset
            directory, or the working directory for an in-memory dataset), a malformed row skipped
            by ``on_bad_record="skip"`` is logged with its index, and ``check_images`` checks the
            headers of path images.
    """
    stats = ReadStats()
    recs = [rec for _, rec in _located_rows(dataset_or_path, split, ReadOptions(**options), stats)]
    logger.info(stats.summary())
    return RecordList(recs, stats)


def _located_rows(
    dataset_or_path: Any, split: str, opts: ReadOptions, stats: ReadStats, labelled: bool = True
) -> Iterator[tuple[str, Record]]:
    """``(where, record)`` of one split (``where``: ``DIR: split 'test', row N``), rows read in
    batches as the iterator advances; the dataset, the split and its columns are checked when
    this is called. ``labelled=False`` (posts to tag): the keyphrases may be absent."""
    root: Path | None
    if isinstance(dataset_or_path, (str, os.PathLike)):
        root = Path(os.path.expanduser(os.fspath(dataset_or_path)))
        ds = _load_from_disk(root)
    else:
        root, ds = None, dataset_or_path
    name = os.fspath(root) if root is not None else "<dataset>"
    ds, split_name = _pick_split(ds, split, name)
    stats.source = f"{name}[{split_name}]"
    _check_columns(ds, stats.source, labelled)
    base = Path(opts.image_dir) if opts.image_dir is not None else (root or Path.cwd())
    images = _Images(base, opts)
    return _parsed_rows(ds, name, split_name, images, _BadRecords(opts, stats), stats, labelled)


def _parsed_rows(
    ds: Any,
    name: str,
    split_name: str,
    images: _Images,
    bad: _BadRecords,
    stats: ReadStats,
    labelled: bool,
) -> Iterator[tuple[str, Record]]:
    for i, row in enumerate(_rows(ds)):
        where = f"{name}: split {split_name!r}, row {i}"
        rec = _parsed(bad, stats, where, _record, row, i, where, images, stats, labelled)
        if rec is not None:
            yield where, rec


def _image_cell(rec: Record) -> dict[str, Any] | None:
    """``{"bytes", "path"}`` of a record's image: the file's own bytes (pixels unchanged), or an
    in-memory image encoded as PNG; None without an image."""
    if rec.image is not None:
        buf = io.BytesIO()
        rec.image.save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}
    if rec.image_path is None:
        return None
    try:
        return {"bytes": Path(rec.image_path).read_bytes(), "path": Path(rec.image_path).name}
    except OSError as exc:
        raise DataError(f"record {rec.id!r}: cannot read image {rec.image_path}: {exc}") from None


def to_hf(records: Sequence[Record]) -> Any:
    """A ``datasets.Dataset`` (columns ``id, image, text, keyphrases``) of ``records``, images
    embedded (self-contained: ``save_to_disk`` needs no image files beside it)."""
    datasets = _datasets()
    list_of = getattr(datasets, "List", None) or datasets.Sequence  # List: datasets >= 4
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "keyphrases": list_of(datasets.Value("string")),
        }
    )
    cols = {
        "id": [r.id for r in records],
        "image": [_image_cell(r) for r in records],
        "text": [r.text for r in records],
        "keyphrases": [list(r.keyphrases) for r in records],
    }
    return datasets.Dataset.from_dict(cols, features=features)


def save_hf(splits: dict[str, Sequence[Record]], directory: str | os.PathLike[str]) -> Path:
    """Save ``{split: records}`` as a ``DatasetDict`` (``valid`` stored as ``validation``) with
    ``save_to_disk``; returns the directory."""
    datasets = _datasets()
    dd = datasets.DatasetDict(
        {SPLIT_NAMES.get(s, (s,))[0]: to_hf(recs) for s, recs in splits.items()}
    )
    dd.save_to_disk(os.fspath(directory))
    return Path(directory)


def write_embedded_images(records: Sequence[Record], out_file: str | os.PathLike[str]) -> list:
    """Records whose in-memory images (embedded in a HF dataset) are written as PNG files under
    ``images/`` beside ``out_file``, their ``image_path`` relative to its directory (as the JSONL
    reader resolves it), so a JSONL conversion loses no image. Other records are returned as
    they are."""
    folder = Path(out_file).parent / "images"
    out = []
    for i, rec in enumerate(records):
        if rec.image is None:
            out.append(rec)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{i:06d}.png"
        img = rec.load_image()
        assert img is not None  # rec.image is set
        img.save(folder / name, format="PNG")
        out.append(rec.replace(image=None, image_path=f"images/{name}"))
    return out
