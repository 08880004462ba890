"""Text files read so that bytes which are not UTF-8 are reported with their line, not as a
``UnicodeDecodeError`` naming a byte offset and no file.

The file is decoded with ``errors="surrogateescape"``: a bad byte becomes a lone surrogate that
:func:`bad_utf8_at` finds in the line (or chunk) that holds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aimkp.errors import DataError


def bad_utf8_at(text: str) -> int | None:
    """Index of the first character of ``text`` (read with ``surrogateescape``) that stands for
    a byte that was not UTF-8; None when there is none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def utf8_error(char: str, where: str, column: int | None = None) -> DataError:
    """The DataError for the bad byte ``char`` stands for, at ``where`` (and ``column``)."""
    byte = ord(char) - 0xDC00 if "\udc80" <= char <= "\udcff" else None
    what = f"byte 0x{byte:02x}" if byte is not None else "a surrogate code point"
    at = f" at column {column}" if column is not None else ""
    return DataError(f"{where}: not valid UTF-8 ({what}{at}); save the file as UTF-8")


def utf8_checked(text: str, where: str) -> str:
    """``text`` when it was valid UTF-8; a DataError naming ``where`` and the column otherwise."""
    i = bad_utf8_at(text)
    if i is not None:
        raise utf8_error(text[i], where, i + 1)
    return text


def open_text(path: Path) -> Any:
    """The file as text; bytes that are not UTF-8 become lone surrogates that
    :func:`utf8_checked` reports with their line, instead of a decode error naming no line.
    A UTF-8 byte-order mark at the start (Windows editors write one) is dropped."""
    try:
        return open(path, encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror or exc}") from None
