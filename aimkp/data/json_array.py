"""JSON decoding for the readers: one value per line (JSONL) or the elements of a top-level array
decoded one at a time (bounded memory), every failure a :class:`~aimkp.errors.DataError` naming
the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aimkp.errors import DataError

from .text_io import bad_utf8_at, open_text, utf8_error


def json_loads(text: str, where: str) -> Any:
    """The JSON value of ``text`` (one line at ``where``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # an integer over 4300 digits, deep nesting
        raise DataError(f"{where}: invalid JSON: {type(exc).__name__}: {exc}") from None


class _JsonArray:
    """The text of a JSON array file held a chunk at a time, with the line of any position."""

    def __init__(self, f: Any, path: Path, chunk_size: int) -> None:
        self.f, self.path, self.chunk_size = f, path, chunk_size
        self.buf, self.pos, self.eof = "", 0, False
        self.lines_before = 0  # newlines in the text already dropped from ``buf``
        self.fill()

    def line(self, pos: int | None = None) -> int:
        """1-based line number of ``pos`` in ``buf`` (default: the current position)."""
        return self.lines_before + self.buf.count("\n", 0, self.pos if pos is None else pos) + 1

    def fill(self) -> None:
        """Drop the consumed text, append the next chunk (checked to be UTF-8)."""
        self.lines_before += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos :], 0
        more = self.f.read(self.chunk_size)
        self.eof = not more
        bad = bad_utf8_at(more)
        if bad is not None:
            self.buf += more[:bad]
            raise utf8_error(more[bad], f"{self.path}:{self.line(len(self.buf))}")
        self.buf += more

    def skip_ws(self) -> bool:
        """Move past JSON whitespace; False at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return True
            if self.eof:
                return False
            self.fill()

    def peek(self) -> str:
        return self.buf[self.pos] if self.skip_ws() else ""

    def decode(self, dec: json.JSONDecoder, where: str) -> Any:
        """The JSON value at the current position (reading more text while it is incomplete)."""
        while True:
            try:
                obj, self.pos = dec.raw_decode(self.buf, self.pos)
                return obj
            except json.JSONDecodeError as exc:
                if self.eof:
                    raise DataError(f"{where}: invalid JSON: {exc.msg}") from None
                self.fill()
            except (ValueError, RecursionError) as exc:  # huge integer, deep nesting
                raise DataError(f"{where}: invalid JSON: {type(exc).__name__}: {exc}") from None


def iter_json_array(path: Path, chunk_size: int = 1 << 20) -> Iterator[tuple[str, int, Any]]:
    """``(where, index, element)`` of a top-level JSON array, one at a time (bounded memory);
    ``where`` is ``"FILE:LINE: record INDEX"``, the line the element starts on."""
    dec = json.JSONDecoder()
    with open_text(path) as f:
        arr = _JsonArray(f, path, chunk_size)
        if arr.peek() != "[":
            raise DataError(
                f"{path}:{arr.line()}: expected a JSON array of records (file must start with '[')"
            )
        arr.pos += 1
        if arr.peek() == "]":
            return
        index = 0
        while True:
            arr.peek()
            where = f"{path}:{arr.line()}: record {index}"
            yield where, index, arr.decode(dec, where)
            index += 1
            c = arr.peek()
            if c == ",":
                arr.pos += 1
                continue
            if c == "]":
                return
            if not c:
                raise DataError(
                    f"{path}:{arr.line()}: record {index}: unexpected end of file inside the array"
                )
            raise DataError(f"{path}:{arr.line()}: after record {index - 1}: expected ',' or ']'")
