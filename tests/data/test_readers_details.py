"""Reader details: a UTF-8 byte-order mark is accepted by every reader (as ``score`` accepts
it), post ids are unique within a file, ``;`` cannot hide inside a keyphrase."""

from __future__ import annotations

import json

import pytest

from aimkp.data import read_records
from aimkp.errors import DataError

BOM = "\ufeff"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_a_byte_order_mark_is_accepted(tmp_path, suffix) -> None:
    obj = {"id": "a", "text": "hello", "keyphrases": ["k one"]}
    body = {
        ".jsonl": json.dumps(obj) + "\n",
        ".json": json.dumps([obj]),
        ".txt": "hello<sep>k one\n",
    }[suffix]
    p = tmp_path / f"posts{suffix}"
    p.write_text(BOM + body, encoding="utf-8")
    (rec,) = read_records(p, with_images=False)
    assert rec.text == "hello" and rec.keyphrases == ["k one"]


def test_duplicate_ids_are_named_with_both_places(tmp_path) -> None:
    p = tmp_path / "p.jsonl"
    rows = [{"id": "x", "text": "t", "keyphrases": ["k"]}] * 2
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        DataError, match=r"p.jsonl:2: duplicate post id 'x' \(first at .*p.jsonl:1\)"
    ):
        read_records(p)
    recs = read_records(p, on_bad_record="skip")  # skipped and counted like any bad record
    assert len(recs) == 1 and recs.stats.skipped["bad record"] == 1


def test_a_semicolon_inside_a_listed_keyphrase_is_refused(tmp_path) -> None:
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"id": "a", "text": "t", "keyphrases": ["a; b", "c"]}]))
    with pytest.raises(DataError, match="keyphrase 'a; b' in 'keyphrases' contains ';'"):
        read_records(p)
    p.write_text(json.dumps([{"id": "a", "text": "t", "keyphrases": "a; b"}]))  # a ;-list
    assert read_records(p)[0].keyphrases == ["a", "b"]
