"""Readers, read statistics, the default dataset and the openclipart cleaning rules."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from aimkp.data import ReadStats, Record, iter_records, load_dataset, read_records, write_jsonl
from aimkp.data import readers as readers_mod
from aimkp.data.openclipart import clean_tags, split_words


def _img(path, color=(255, 0, 0)) -> None:
    Image.new("RGB", (8, 6), color).save(path, format="PNG")  # lossless, whatever the name


@pytest.fixture
def cmkp_dir(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _img(imgs / "A1.jpg")
    _img(imgs / "B2.jpg", (0, 0, 255))
    (imgs / "C3.jpg").write_bytes(b"not an image")
    lines = [
        "some blue flowers<sep>wildflower hour;gardens hour<sep>https://pbs.twimg.com/media/A1.jpg",
        "",
        "a dog<sep>Dogs Of  Twitter<sep>https://pbs.twimg.com/media/B2.jpg",
        "lost image<sep>x<sep>https://pbs.twimg.com/media/ZZ.jpg",
        "broken image<sep>y<sep>https://pbs.twimg.com/media/C3.jpg",
    ]
    (tmp_path / "test_src.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_cmkp_lines_with_images_error_by_default(cmkp_dir) -> None:
    with pytest.raises(ValueError, match=r"test_src.txt:4: missing image: .*ZZ.jpg"):
        read_records(cmkp_dir / "test_src.txt", image_dir=cmkp_dir / "imgs")


def test_cmkp_lines_skip_and_count(cmkp_dir) -> None:
    recs = read_records(
        cmkp_dir / "test_src.txt", image_dir=cmkp_dir / "imgs", on_missing_image="skip"
    )
    assert [r.keyphrases for r in recs] == [
        ["wildflower hour", "gardens hour"],
        ["dogs of twitter"],
    ]
    assert recs[0].text == "some blue flowers" and recs[0].id == "0"
    assert recs[0].meta["image_url"].endswith("A1.jpg")
    im = recs[1].load_image()
    assert im.mode == "RGB" and im.size == (8, 6) and im.getpixel((0, 0)) == (0, 0, 255)
    st = recs.stats
    assert st.read == 2
    assert dict(st.skipped) == {"blank line": 1, "missing image": 1, "unreadable image": 1}
    assert st.examples["missing image"][0].endswith("test_src.txt:4")
    summary = st.summary()
    assert "read 2 records, skipped 3" in summary and "unreadable image: 1" in summary


def test_cmkp_without_images_and_malformed_lines(tmp_path) -> None:
    p = tmp_path / "x.txt"
    p.write_text("text<sep>kp<sep>http://u/a.jpg\nno separator here\n")
    it = iter_records(p, with_images=False)
    assert next(it).image_path is None
    with pytest.raises(ValueError, match=r"x.txt:2: expected .* got 1 fields"):
        next(it)
    p.write_text("text<sep> ; <sep>http://u/a.jpg\n")
    with pytest.raises(ValueError, match=r"x.txt:1: no keyphrases"):
        read_records(p, with_images=False)


def _aimkp_obj(i: int, image: str | None = None) -> dict:
    text = f"post number {i} with some words"
    return {
        "id": f"{i:07d}",
        "image": image,
        "text": text,
        "conversations": [
            {"from": "human", "value": f"<image>{text}\nWhat phrases should be used to tag?"},
            {"from": "gpt", "value": f"Topic {i}, shared tag"},
        ],
    }


def test_aimkp_json_streams_across_chunks(tmp_path, monkeypatch) -> None:
    objs = [_aimkp_obj(i) for i in range(40)]
    p = tmp_path / "test.json"
    p.write_text(json.dumps(objs, indent=2))
    orig = readers_mod._iter_json_array
    # a tiny chunk forces records to straddle chunk boundaries
    monkeypatch.setattr(readers_mod, "_iter_json_array", lambda path: orig(path, chunk_size=37))
    recs = read_records(p)
    assert len(recs) == 40 and recs.stats.read == 40
    assert recs[7].id == "0000007" and recs[7].keyphrases == ["topic 7", "shared tag"]
    assert recs[7].image_path is None


def test_aimkp_json_errors_name_record(tmp_path) -> None:
    p = tmp_path / "bad.json"
    bad = _aimkp_obj(1)
    bad["conversations"] = [{"from": "human", "value": "x"}]
    p.write_text(json.dumps([_aimkp_obj(0), bad]))
    with pytest.raises(ValueError, match=r"bad.json:1: record 1: 'conversations' has no turn"):
        read_records(p)
    p.write_text('[{"id": 1, "text": "a", "keyphrases": ["x"]}, {"id": 2,')
    with pytest.raises(ValueError, match=r"bad.json:1: record 1: invalid JSON"):
        read_records(p)
    p.write_text('{"id": 1}')
    with pytest.raises(ValueError, match="JSON array"):
        read_records(p)


def test_aimkp_json_images_by_name(tmp_path) -> None:
    (tmp_path / "imgs").mkdir()
    _img(tmp_path / "imgs" / "D0wn.jpg")
    p = tmp_path / "t.json"
    p.write_text(json.dumps([_aimkp_obj(0, "D0wn.jpg"), _aimkp_obj(1, "gone.jpg")]))
    recs = read_records(p, image_dir=tmp_path / "imgs", on_missing_image="skip")
    assert len(recs) == 1 and recs[0].load_image().size == (8, 6)
    assert recs.stats.skipped["missing image"] == 1
    assert recs.stats.examples["missing image"] == [f"{p}:1: record 1"]


def test_jsonl_reader(tmp_path) -> None:
    _img(tmp_path / "a.png")
    p = tmp_path / "d.jsonl"
    rows = [
        {"id": "a", "image": "a.png", "text": "Red  ", "keyphrases": ["Red Thing", "x"]},
        {"text": "no id, no image", "keyphrases": "one; two"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = read_records(p)
    assert recs[0].image_path == str(tmp_path / "a.png")
    assert recs[0].keyphrases == ["red thing", "x"] and recs[0].text == "Red"
    assert recs[1].id == "1" and recs[1].keyphrases == ["one", "two"] and not recs[1].has_image
    assert recs.stats.skipped["blank line"] == 1
    p.write_text('{"id": "a", "text": "t", "keyphrases": ["k"]}\n{"id": oops}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: invalid JSON"):
        read_records(p)
    p.write_text('{"id": "a", "text": "t", "keyphrases": [1, 2]}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: 'keyphrases' must be"):
        read_records(p)


def test_load_dataset_specs(tmp_path) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    (d / "valid.jsonl").write_text('{"id": "v", "text": "t", "keyphrases": ["k"]}\n')
    assert [r.id for r in load_dataset(str(d), "valid")] == ["v"]
    assert [r.id for r in load_dataset(str(d / "valid.jsonl"), "test")] == ["v"]
    with pytest.raises(ValueError, match="no file for split 'test'"):
        load_dataset(str(d), "test")
    with pytest.raises(ValueError, match="no such data file"):
        iter_records(tmp_path / "nope.jsonl")  # checked at the call, before iteration
    with pytest.raises(ValueError, match="on_missing_image"):
        iter_records(d / "valid.jsonl", on_missing_image="ignore")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="cannot tell the format from the extension '.csv'"):
        iter_records(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="not 'default'"):
        load_dataset(str(tmp_path / "missing"), "test")
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("default", "dev")


def test_default_dataset_is_complete() -> None:
    sizes = {}
    ids = set()
    for split in ("train", "valid", "test"):
        recs = load_dataset("default", split)
        sizes[split] = len(recs)
        assert recs.stats.total_skipped == 0
        assert all(r.keyphrases and r.text and r.image_path for r in recs)
        assert all(k == k.lower().strip() for r in recs for k in r.keyphrases)
        ids |= {r.id for r in recs}
    assert 200 <= sizes["valid"] <= 300 and 200 <= sizes["test"] <= 300
    assert sizes["train"] >= 2000
    assert len(ids) == sum(sizes.values())  # no id shared across splits
    im = load_dataset("default", "test")[0].load_image()
    assert im.mode == "RGB" and im.size == (96, 96)


def test_openclipart_tag_cleaning() -> None:
    assert split_words("musicStuff") == "music stuff"
    assert split_words("north_america") == "north america"
    assert split_words("mime-types") == "mime types"
    got = clean_tags(
        [
            "Mammal",
            "clip art",
            "ClipArt",
            "PNG",
            "united_nations_member",
            "space astronomy planet",
            "Jane Roe",
            "roe",
            "42",
            "0x8863bcc",
            "wide angle",
            "bat",
            "bat",
        ],
        creator="Jane Roe",
    )
    assert got == [
        "mammal",
        "united nations member",
        "space",
        "astronomy",
        "planet",
        "wide angle",
        "bat",
    ]


def test_record_helpers() -> None:
    r = Record("1", "t", ["a"], image=Image.new("L", (4, 4), 128))
    assert r.load_image().mode == "RGB" and r.has_image
    assert r.load_image().getpixel((0, 0)) == (128, 128, 128)
    clear = Record("1", "t", ["a"], image=Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert clear.load_image().getpixel((1, 1)) == (255, 255, 255)  # transparent -> white
    c = r.replace(text="u")
    c.keyphrases.append("b")
    assert r.keyphrases == ["a"] and c.text == "u"
    with pytest.raises(ValueError, match="missing image"):
        Record("2", "t", ["a"], image_path="/nonexistent.png").load_image()
    s = ReadStats(source="x")
    s.skip("blank line", "x:1")
    assert s.summary() == "x: read 0 records, skipped 1 (blank line: 1 [x:1])"


def test_data_cli_info_and_convert(tmp_path, capsys) -> None:
    from aimkp.cli import main

    src = tmp_path / "s.txt"
    src.write_text("a b<sep>x;y<sep>http://h/i.jpg\n\nc d<sep>y<sep>http://h/j.jpg\n")
    _img(tmp_path / "i.jpg")
    rc = main(["data", "info", "--data", str(src), "--on-missing-image", "skip"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "read 1 records, skipped 2 (blank line: 1" in out and "missing image: 1" in out
    rc = main(["data", "info", "--data", str(src)])
    assert rc == 2 and "s.txt:3: missing image" in capsys.readouterr().err
    dst = tmp_path / "o.jsonl"
    rc = main(["data", "convert", "--data", str(src), "--out", str(dst), "--no-images"])
    assert rc == 0
    back = read_records(dst)
    assert [r.keyphrases for r in back] == [["x", "y"], ["y"]] and back[1].text == "c d"


# Keyphrase words drawn so that almost nothing is filtered out (hypothesis' health check fails a
# strategy that rejects most draws): no separators, control, format, private-use or unassigned
# characters, lower-cased by construction; the filters only catch the rare leftovers (a character
# whose lower case is not stable, e.g. U+0130).
_word = (
    st.text(
        alphabet=st.characters(
            blacklist_categories=("Cs", "Cc", "Cf", "Co", "Cn", "Zs", "Zl", "Zp"),
            blacklist_characters=";,",
        ),
        min_size=1,
        max_size=6,
    )
    .map(str.lower)
    .filter(lambda w: w.strip() == w and w.isprintable() and ";" not in w and "," not in w)
)
_phrase = st.lists(_word, min_size=1, max_size=3).map(" ".join).filter(lambda p: p.lower() == p)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(max_size=40), st.lists(_phrase, min_size=1, max_size=4)), max_size=8
    ),
    st.integers(min_value=1, max_value=64),
)
def test_json_and_jsonl_round_trip(tmp_path_factory, posts, chunk) -> None:
    """Any texts / keyphrases survive JSONL and the chunked AimKP-JSON reader, at any chunk size."""
    d = tmp_path_factory.mktemp("rt")
    recs = [
        Record(str(i), t.strip(), [" ".join(k.split()) for k in kps])
        for i, (t, kps) in enumerate(posts)
    ]
    write_jsonl(recs, d / "a.jsonl")
    back = read_records(d / "a.jsonl")
    assert [(r.id, r.text, r.keyphrases) for r in back] == [
        (r.id, r.text, r.keyphrases) for r in recs
    ]
    arr = [
        {
            "id": r.id,
            "image": None,
            "text": r.text,
            "conversations": [
                {"from": "human", "value": "<image>" + r.text},
                {"from": "gpt", "value": ", ".join(r.keyphrases)},
            ],
        }
        for r in recs
    ]
    (d / "a.json").write_text(json.dumps(arr, ensure_ascii=False, indent=1), encoding="utf-8")
    got = [
        readers_mod._record_from_obj(obj, "x", str(i), _NoImages(), ReadStats())
        for _, i, obj in readers_mod._iter_json_array(d / "a.json", chunk_size=chunk)
    ]
    assert [(r.id, r.text, r.keyphrases) for r in got] == [
        (r.id, r.text, r.keyphrases) for r in recs
    ]


class _NoImages:
    def resolve(self, value, where, stats):  # noqa: ANN001, ANN201
        return True, None
