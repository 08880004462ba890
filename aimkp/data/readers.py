"""Readers for the three post formats, all streaming, all reporting a :class:`ReadStats`.

- CMKP lines (``.txt``): ``text<sep>kp1;kp2<sep>image_url``; the image is looked up under
  ``image_dir`` (default: the file's directory) by the URL's file name.
- AimKP reference JSON (``.json``): ``[{id, image, text, conversations}]`` with the keyphrases in
  the ``gpt`` turn as ``"kp1, kp2"`` (a ``keyphrases`` list is taken too). The array is decoded one
  element at a time, so a large file is never held as one Python object.
- Generic JSONL (``.jsonl``): one ``{id, image, text, keyphrases}`` object per line; ``keyphrases``
  is a list of strings (or one string with ``;`` or ``,`` separators).

A malformed line or record (bad JSON, a missing field, bytes that are not UTF-8) raises
:class:`aimkp.errors.DataError` naming the file and the line (``f.jsonl:7: ...``; AimKP JSON:
``f.json:12: record 3: ...``, the line where the record starts) and the reason; no other exception
type leaves a reader for any file content. With ``on_bad_record="skip"`` such a record is skipped
instead, logged as a warning with its location and counted (``"bad record"``); the rest of the
file is read. A JSON array whose syntax breaks cannot be resynchronised: that stays an error.

Images are decoded in full when a record is read (``check_images``): a missing or unreadable
image (absent, not an image, cut short) is an error too, unless ``on_missing_image="skip"``: then
the record is skipped and counted under its reason. Blank lines are counted as skipped
(``"blank line"``), never dropped silently.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from typing_extensions import Unpack

from aimkp.data.images import path_problem, unreadable_reason
from aimkp.errors import DataError

from .json_array import iter_json_array as _iter_json_array
from .json_array import json_loads as _json_loads
from .options import ReadKwargs, ReadOptions
from .record import ReadStats, Record, RecordList
from .text_io import open_text, utf8_checked

logger = logging.getLogger("aimkp.data")

CMKP_SEP = "<sep>"
FORMATS = ("cmkp", "aimkp_json", "jsonl")


class ImageError(DataError):
    """A record's image is missing or unreadable (governed by ``on_missing_image``, not by
    ``on_bad_record``)."""


_WS = re.compile(r"\s+")


def normalize_keyphrase(phrase: str) -> str:
    """Lower-case, strip, collapse whitespace: ``" Wildflower  Hour "`` -> ``"wildflower hour"``."""
    return _WS.sub(" ", phrase.strip().lower())


def split_keyphrases(value: str) -> list[str]:
    """Split a keyphrase string on ``;`` (CMKP style) or, when it has none, on ``,`` (AimKP style).

    Empty pieces are dropped: ``"a; ;b"`` -> ``["a", "b"]``.
    """
    sep = ";" if ";" in value else ","
    return [p for p in (normalize_keyphrase(x) for x in value.split(sep)) if p]


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"cmkp"`` for ``.txt``, ``"aimkp_json"`` for ``.json``, ``"jsonl"`` for ``.jsonl``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        return "cmkp"
    if suffix == ".json":
        return "aimkp_json"
    if suffix == ".jsonl":
        return "jsonl"
    raise DataError(
        f"{path}: cannot tell the format from the extension {suffix!r}; "
        "expected .txt (CMKP lines), .json (AimKP reference JSON) or .jsonl"
    )


class _ImageResolver:
    """Turns an image field (path, file name or URL) into a checked local path."""

    def __init__(self, data_path: Path, opts: ReadOptions) -> None:
        self.base = Path(opts.image_dir) if opts.image_dir is not None else data_path.parent
        self.by_name = opts.image_dir is not None
        self.on_missing = opts.on_missing_image
        self.with_images = opts.with_images
        self.check = opts.check_images

    def resolve(self, value: Any, where: str, stats: ReadStats) -> tuple[bool, str | None]:
        """Return ``(keep, path)``; ``keep`` is False when the record must be skipped."""
        if not self.with_images or value is None or value == "":
            return True, None
        if not isinstance(value, str):
            raise DataError(
                f"{where}: 'image' must be a string or null, got {type(value).__name__}"
            )
        try:  # a NUL byte or an over-long name makes the path itself unusable
            cand, reason = self._check(value)
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{where}: 'image' {value[:80]!r} is not a usable path ({exc})"
            ) from None
        if reason is None:
            return True, os.fspath(cand)
        if self.on_missing == "skip":
            stats.skip(reason, where)
            return False, None
        raise ImageError(
            f"{where}: {reason}: {cand} (pass image_dir=..., or on_missing_image='skip' "
            "to skip and count such records)"
        )

    def _check(self, value: str) -> tuple[Path, str | None]:
        """The candidate path for an image field and why it is unusable (None: it is fine)."""
        if "://" in value:  # a URL: the image was downloaded under base by its file name
            cand = self.base / value.rsplit("/", 1)[-1]
        elif self.by_name:
            cand = self.base / value
            if not cand.exists():
                cand = self.base / Path(value).name
        else:
            cand = Path(value) if os.path.isabs(value) else self.base / value
        if not cand.is_file():  # missing, a directory, not a regular file
            return cand, path_problem(cand)
        return cand, unreadable_reason(cand) if self.check else None


def _phrases_from_value(value: Any, where: str, field_name: str) -> list[str]:
    if isinstance(value, str):
        return split_keyphrases(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        for v in value:
            if ";" in v:  # ';' separates keyphrases in prediction files: it would split this one
                raise DataError(
                    f"{where}: keyphrase {v!r} in '{field_name}' contains ';', which separates "
                    "keyphrases in prediction files; remove it or split the phrase"
                )
        return [p for p in (normalize_keyphrase(v) for v in value) if p]
    raise DataError(f"{where}: '{field_name}' must be a string or a list of strings")


class _BadRecords:
    """What to do with a malformed record: raise (``"error"``) or skip, log and count it, as
    ``opts.on_bad_record`` says."""

    def __init__(self, opts: ReadOptions, stats: ReadStats) -> None:
        self.skip = opts.on_bad_record == "skip"
        self.stats = stats

    def handle(self, exc: DataError, where: str) -> None:
        """Re-raise ``exc`` unless skipping; image errors follow ``on_missing_image`` instead."""
        if not self.skip or isinstance(exc, ImageError):
            raise exc
        self.stats.skip("bad record", where)
        logger.warning("skipped bad record: %s", exc)


def _parsed(
    bad: _BadRecords, stats: ReadStats, where: str, parse: Callable[..., Record | None], *args: Any
) -> Record | None:
    """``parse(*args)`` counted in ``stats.read``; None when it skips the record or raises a
    DataError that ``bad`` (``--on-bad-record skip``) swallows."""
    try:
        rec = parse(*args)
    except DataError as exc:
        bad.handle(exc, where)
        return None
    if rec is not None:
        stats.read += 1
    return rec


def _iter_located_lines(
    path: Path, parse: Any, bad: _BadRecords, stats: ReadStats
) -> Iterator[tuple[str, Record]]:
    """``(file:line, record)`` of a one-record-per-line file, blank lines counted as skipped;
    ``parse(line, lineno, where)`` -> Record | None."""

    def parse_line(line: str, lineno: int, where: str) -> Record | None:
        return parse(utf8_checked(line, where), lineno, where)

    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                stats.skip("blank line", where)
                continue
            rec = _parsed(bad, stats, where, parse_line, line, lineno, where)
            if rec is not None:
                yield where, rec


def _cmkp_line(
    line: str,
    lineno: int,
    where: str,
    res: _ImageResolver,
    stats: ReadStats,
    labelled: bool = True,
) -> Record | None:
    parts = line.split(CMKP_SEP)
    if len(parts) not in (2, 3):
        raise DataError(
            f"{where}: expected 'text<sep>kp1;kp2<sep>image_url' (2 or 3 fields), "
            f"got {len(parts)} fields"
        )
    text = parts[0].strip()
    kps = [p for p in (normalize_keyphrase(x) for x in parts[1].split(";")) if p]
    if not kps and labelled:
        raise DataError(f"{where}: no keyphrases in the second field")
    url = parts[2].strip() if len(parts) == 3 else ""
    keep, img = res.resolve(url or None, where, stats)
    if not keep:
        return None
    meta = {"image_url": url} if url else {}
    return Record(
        id=str(lineno - 1), text=text, keyphrases=kps, image_path=img, meta=meta, source=where
    )


def _jsonl_line(
    line: str, lineno: int, where: str, parse_obj: Callable[..., Record | None]
) -> Record | None:
    """One JSONL line: the object parser of AimKP JSON (``parse_obj``) on the line's object."""
    return parse_obj(_json_loads(line, where), where, str(lineno - 1))


def _record_from_obj(
    obj: Any,
    where: str,
    default_id: str,
    res: _ImageResolver,
    stats: ReadStats,
    labelled: bool = True,
) -> Record | None:
    """``labelled=False`` (posts to tag): keyphrases may be absent, null or empty."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string")
    if "keyphrases" in obj and (labelled or obj["keyphrases"] is not None):
        kps = _phrases_from_value(obj["keyphrases"], where, "keyphrases")
    elif "conversations" in obj:
        conv = obj["conversations"]
        if not isinstance(conv, list):
            raise DataError(f"{where}: 'conversations' must be a list of turns")
        answers = [t.get("value") for t in conv if isinstance(t, dict) and t.get("from") == "gpt"]
        if not answers and labelled:
            raise DataError(f"{where}: 'conversations' has no turn from 'gpt'")
        kps = _phrases_from_value(answers[0], where, "conversations[gpt].value") if answers else []
    elif not labelled:
        kps = []
    else:
        raise DataError(f"{where}: no 'keyphrases' and no 'conversations' field")
    if not kps and labelled:
        raise DataError(f"{where}: empty keyphrase list")
    rid = obj.get("id", default_id)
    stats.check_unique_id(str(rid), where)
    keep, img = res.resolve(obj.get("image"), where, stats)
    if not keep:
        return None
    meta = {k: v for k, v in obj.items() if k not in ("id", "text", "keyphrases", "image")}
    meta.pop("conversations", None)
    if isinstance(obj.get("image"), str) and "://" in obj["image"]:
        meta["image_url"] = obj["image"]
    return Record(
        id=str(rid), text=text.strip(), keyphrases=kps, image_path=img, meta=meta, source=where
    )


def _located_records(
    path: Path,
    fmt: str,
    res: _ImageResolver,
    bad: _BadRecords,
    stats: ReadStats,
    labelled: bool = True,
) -> Iterator[tuple[str, Record]]:
    """``(where, record)`` of a data file in ``fmt``: its records parsed by that format's parser."""
    parse_obj = functools.partial(_record_from_obj, res=res, stats=stats, labelled=labelled)
    if fmt == "aimkp_json":
        return _located_json_array(path, parse_obj, bad, stats)
    if fmt == "cmkp":
        parse = functools.partial(_cmkp_line, res=res, stats=stats, labelled=labelled)
    else:
        parse = functools.partial(_jsonl_line, parse_obj=parse_obj)
    return _iter_located_lines(path, parse, bad, stats)


def _located_json_array(
    path: Path, parse_obj: Callable[..., Record | None], bad: _BadRecords, stats: ReadStats
) -> Iterator[tuple[str, Record]]:
    """``(where, record)`` of an AimKP JSON array; ``parse_obj(obj, where, index)`` parses one."""
    for where, index, obj in _iter_json_array(path):
        rec = _parsed(bad, stats, where, parse_obj, obj, where, str(index))
        if rec is not None:
            yield where, rec


def iter_records(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    stats: ReadStats | None = None,
    **options: Unpack[ReadKwargs],
) -> Iterator[Record]:
    """Stream the records of one file (CMKP ``.txt``, AimKP ``.json`` or ``.jsonl``).

    Args:
        path: the file.
        fmt: force a format (``"cmkp"``, ``"aimkp_json"``, ``"jsonl"``) instead of the extension.
        stats: filled in as the iterator advances; a summary is logged at INFO when it ends.
        **options: the reader options (:class:`~aimkp.data.options.ReadOptions`): ``image_dir``,
            ``on_missing_image``, ``on_bad_record``, ``with_images``, ``check_images``.

    The file, format and options are checked when this is called (not at the first ``next``).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    fmt = fmt or detect_format(p)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    opts = ReadOptions(**options)
    st = stats if stats is not None else ReadStats()
    st.source = os.fspath(p)
    located = _located_records(p, fmt, _ImageResolver(p, opts), _BadRecords(opts, st), st)
    return _logged((rec for _, rec in located), st)


def _logged(it: Iterator[Record], st: ReadStats) -> Iterator[Record]:
    yield from it
    logger.info(st.summary())


def read_records(
    path: str | os.PathLike[str], *, fmt: str | None = None, **options: Unpack[ReadKwargs]
) -> RecordList:
    """All records of one file as a :class:`RecordList` (``.stats``: the :class:`ReadStats`);
    the arguments of :func:`iter_records`."""
    stats = ReadStats()
    recs = list(iter_records(path, fmt=fmt, stats=stats, **options))
    return RecordList(recs, stats)


def write_jsonl(records: list[Record], path: str | os.PathLike[str]) -> None:
    """Write records in the generic JSONL form (image paths as stored in the records)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
