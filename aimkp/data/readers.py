"""Readers for the three post formats, all streaming, all reporting a :class:`ReadStats`.

- CMKP lines (``.txt``): ``text<sep>kp1;kp2<sep>image_url``; the image is looked up under
  ``image_dir`` (default: the file's directory) by the URL's file name.
- AimKP reference JSON (``.json``): ``[{id, image, text, conversations}]`` with the keyphrases in
  the ``gpt`` turn as ``"kp1, kp2"`` (a ``keyphrases`` list is taken too). The array is decoded one
  element at a time, so a large file is never held as one Python object.
- Generic JSONL (``.jsonl``): one ``{id, image, text, keyphrases}`` object per line; ``keyphrases``
  is a list of strings (or one string with ``;`` or ``,`` separators).

A malformed line or record raises ``ValueError`` naming the file and the line (or record index)
and the reason. A missing or unreadable image is an error too, unless
``on_missing_image="skip"``: then the record is skipped and counted under its reason. Blank lines
are counted as skipped (``"blank line"``), never dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .record import ReadStats, Record

logger = logging.getLogger("aimkp.data")

CMKP_SEP = "<sep>"
FORMATS = ("cmkp", "aimkp_json", "jsonl")
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
    raise ValueError(
        f"{path}: cannot tell the format from the extension {suffix!r}; "
        "expected .txt (CMKP lines), .json (AimKP reference JSON) or .jsonl"
    )


class _ImageResolver:
    """Turns an image field (path, file name or URL) into a checked local path."""

    def __init__(
        self,
        data_path: Path,
        image_dir: str | os.PathLike[str] | None,
        on_missing_image: str,
        with_images: bool,
        check_images: bool,
    ) -> None:
        if on_missing_image not in ("error", "skip"):
            raise ValueError(
                f"on_missing_image must be 'error' or 'skip', got {on_missing_image!r}"
            )
        self.base = Path(image_dir) if image_dir is not None else data_path.parent
        self.by_name = image_dir is not None
        self.on_missing = on_missing_image
        self.with_images = with_images
        self.check = check_images

    def resolve(self, value: Any, where: str, stats: ReadStats) -> tuple[bool, str | None]:
        """Return ``(keep, path)``; ``keep`` is False when the record must be skipped."""
        if not self.with_images or value is None or value == "":
            return True, None
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: 'image' must be a string or null, got {type(value).__name__}"
            )
        if "://" in value:  # a URL: the image was downloaded under base by its file name
            cand = self.base / value.rsplit("/", 1)[-1]
        elif self.by_name:
            cand = self.base / value
            if not cand.exists():
                cand = self.base / Path(value).name
        else:
            cand = Path(value) if os.path.isabs(value) else self.base / value
        reason = None
        if not cand.is_file():
            reason = "missing image"
        elif self.check:
            reason = _unreadable_reason(cand)
        if reason is None:
            return True, os.fspath(cand)
        if self.on_missing == "skip":
            stats.skip(reason, where)
            return False, None
        raise ValueError(
            f"{where}: {reason}: {cand} (pass image_dir=..., or on_missing_image='skip' "
            "to skip and count such records)"
        )


def _unreadable_reason(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - reads the header only
    except (UnidentifiedImageError, OSError):
        return "unreadable image"
    return None


def _phrases_from_value(value: Any, where: str, field_name: str) -> list[str]:
    if isinstance(value, str):
        return split_keyphrases(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [p for p in (normalize_keyphrase(v) for v in value) if p]
    raise ValueError(f"{where}: '{field_name}' must be a string or a list of strings")


def _iter_cmkp(path: Path, res: _ImageResolver, stats: ReadStats) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                stats.skip("blank line", where)
                continue
            parts = line.split(CMKP_SEP)
            if len(parts) not in (2, 3):
                raise ValueError(
                    f"{where}: expected 'text<sep>kp1;kp2<sep>image_url' (2 or 3 fields), "
                    f"got {len(parts)} fields"
                )
            text = parts[0].strip()
            kps = [p for p in (normalize_keyphrase(x) for x in parts[1].split(";")) if p]
            if not kps:
                raise ValueError(f"{where}: no keyphrases in the second field")
            url = parts[2].strip() if len(parts) == 3 else ""
            keep, img = res.resolve(url or None, where, stats)
            if not keep:
                continue
            stats.read += 1
            meta = {"image_url": url} if url else {}
            yield Record(id=str(lineno - 1), text=text, keyphrases=kps, image_path=img, meta=meta)


def _record_from_obj(
    obj: Any, where: str, default_id: str, res: _ImageResolver, stats: ReadStats
) -> Record | None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ValueError(f"{where}: 'text' must be a string")
    if "keyphrases" in obj:
        kps = _phrases_from_value(obj["keyphrases"], where, "keyphrases")
    elif "conversations" in obj:
        conv = obj["conversations"]
        if not isinstance(conv, list):
            raise ValueError(f"{where}: 'conversations' must be a list of turns")
        answers = [t.get("value") for t in conv if isinstance(t, dict) and t.get("from") == "gpt"]
        if not answers:
            raise ValueError(f"{where}: 'conversations' has no turn from 'gpt'")
        kps = _phrases_from_value(answers[0], where, "conversations[gpt].value")
    else:
        raise ValueError(f"{where}: no 'keyphrases' and no 'conversations' field")
    if not kps:
        raise ValueError(f"{where}: empty keyphrase list")
    rid = obj.get("id", default_id)
    keep, img = res.resolve(obj.get("image"), where, stats)
    if not keep:
        return None
    meta = {k: v for k, v in obj.items() if k not in ("id", "text", "keyphrases", "image")}
    meta.pop("conversations", None)
    if isinstance(obj.get("image"), str) and "://" in obj["image"]:
        meta["image_url"] = obj["image"]
    return Record(id=str(rid), text=text.strip(), keyphrases=kps, image_path=img, meta=meta)


def _iter_jsonl(path: Path, res: _ImageResolver, stats: ReadStats) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                stats.skip("blank line", where)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
            rec = _record_from_obj(obj, where, str(lineno - 1), res, stats)
            if rec is not None:
                stats.read += 1
                yield rec


def _iter_json_array(path: Path, chunk_size: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """Decode the elements of a top-level JSON array one at a time (bounded memory)."""
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk_size)
        pos = 0
        eof = False

        def fill() -> None:
            nonlocal buf, pos, eof
            more = f.read(chunk_size)
            if not more:
                eof = True
            buf = buf[pos:] + more
            pos = 0

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return
                fill()

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise ValueError(f"{path}: expected a JSON array of records (file must start with '[')")
        pos += 1
        index = 0
        skip_ws()
        if pos < len(buf) and buf[pos] == "]":
            return
        while True:
            skip_ws()
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    if eof:
                        raise ValueError(
                            f"{path}: record {index}: invalid JSON: {exc.msg}"
                        ) from exc
                    fill()
            pos = end
            yield index, obj
            index += 1
            skip_ws()
            if pos >= len(buf):
                raise ValueError(f"{path}: record {index}: unexpected end of file inside the array")
            if buf[pos] == ",":
                pos += 1
                continue
            if buf[pos] == "]":
                return
            raise ValueError(f"{path}: after record {index - 1}: expected ',' or ']'")


def _iter_aimkp_json(path: Path, res: _ImageResolver, stats: ReadStats) -> Iterator[Record]:
    for index, obj in _iter_json_array(path):
        where = f"{path}: record {index}"
        rec = _record_from_obj(obj, where, str(index), res, stats)
        if rec is not None:
            stats.read += 1
            yield rec


def iter_records(
    path: str | os.PathLike[str],
    *,
    image_dir: str | os.PathLike[str] | None = None,
    on_missing_image: str = "error",
    with_images: bool = True,
    check_images: bool = True,
    fmt: str | None = None,
    stats: ReadStats | None = None,
) -> Iterator[Record]:
    """Stream the records of one file (CMKP ``.txt``, AimKP ``.json`` or ``.jsonl``).

    Args:
        path: the file.
        image_dir: where images live; a URL or bare file name is looked up there by its file name.
            Default: paths are relative to the data file's directory.
        on_missing_image: ``"error"`` (default) raises on a missing/unreadable image; ``"skip"``
            skips the record and counts it in ``stats``.
        with_images: False ignores the image field entirely (``image_path=None``), e.g. scoring.
        check_images: open each image's header to catch unreadable files early.
        fmt: force a format (``"cmkp"``, ``"aimkp_json"``, ``"jsonl"``) instead of the extension.
        stats: filled in as the iterator advances; a summary is logged at INFO when it ends.

    The file, format and options are checked when this is called (not at the first ``next``).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such data file")
    fmt = fmt or detect_format(p)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    st = stats if stats is not None else ReadStats()
    st.source = os.fspath(p)
    res = _ImageResolver(p, image_dir, on_missing_image, with_images, check_images)
    reader = {"cmkp": _iter_cmkp, "aimkp_json": _iter_aimkp_json, "jsonl": _iter_jsonl}[fmt]
    return _logged(reader(p, res, st), st)


def _logged(it: Iterator[Record], st: ReadStats) -> Iterator[Record]:
    yield from it
    logger.info(st.summary())


def read_records(path: str | os.PathLike[str], **kwargs: Any) -> list[Record]:
    """All records of one file as a :class:`RecordList` (``.stats``: the :class:`ReadStats`)."""
    from .record import RecordList

    stats = ReadStats()
    recs = list(iter_records(path, stats=stats, **kwargs))
    return RecordList(recs, stats)


def write_jsonl(records: list[Record], path: str | os.PathLike[str]) -> None:
    """Write records in the generic JSONL form (image paths as stored in the records)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
