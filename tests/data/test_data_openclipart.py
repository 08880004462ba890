"""The openclipart builder end to end on a tiny SVG tree written here (needs cairosvg)."""

from __future__ import annotations

import json

import pytest

from aimkp.cli import main
from aimkp.data import load_dataset
from aimkp.data.openclipart import build, collect, curate, parse_svg_metadata

pytest.importorskip("cairosvg")

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="40" height="20">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:description>{desc}</dc:description>
    <dc:subject><rdf:Bag>{tags}</rdf:Bag></dc:subject>
    <dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
    <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  {body}
</svg>
"""
RECT = '<rect x="2" y="2" width="36" height="16" fill="#{c}"/>'


def _write(root, rel, title, tags, creator="Ann Artist", desc="", body=None, colour="c02020"):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    lis = "".join(f"<rdf:li>{t}</rdf:li>" for t in tags)
    p.write_text(
        SVG.format(
            title=title, desc=desc, tags=lis, creator=creator, body=body or RECT.format(c=colour)
        )
    )
    return p


@pytest.fixture
def svg_root(tmp_path):
    root = tmp_path / "svg"
    for i in range(6):
        _write(root, f"animals/cat_{i}_ann_artist_01.svg", f"Cat {i}", ["animal", "cat", "clipart"])
    for i in range(4):
        _write(
            root,
            f"food/apple{i}.svg",
            "Lemon SVG theme",
            ["food", "fruit", "Ann Artist"],
            colour="20c020",
        )
    # the apples share a collection title, but 4 < COLLECTION_TITLE_MIN (10): the title stays
    _write(root, "food/rare.svg", "Rare thing", ["uniqueword"], desc="one of a kind")
    _write(root, "shapes/blank.svg", "Blank", ["animal"], body="<g/>")  # renders blank
    _write(root, "shapes/dup.svg", "Cat 0", ["animal", "cat"])  # duplicate of cat_0
    (root / "bad.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    return root


def test_parse_and_curate(svg_root) -> None:
    d = parse_svg_metadata(svg_root / "food/rare.svg")
    assert (d.title, d.description, d.creator, d.tags) == (
        "Rare thing",
        "one of a kind",
        "Ann Artist",
        ["uniqueword"],
    )
    cands, st = collect(svg_root)
    assert st["no metadata"] == 1 and st["files"] == 14
    by_path = {c["path"]: c for c in cands}
    assert by_path["animals/cat_1_ann_artist_01.svg"]["keyphrases"] == ["animal", "cat"]
    assert by_path["food/apple0.svg"]["keyphrases"] == ["food", "fruit"]  # author tag dropped
    assert by_path["food/rare.svg"]["text"] == "Rare thing. one of a kind"
    kept, st2 = curate(cands, min_freq=2, max_per_tagset=3)
    paths = {c["path"] for c in kept}
    assert "food/rare.svg" not in paths  # its only keyphrase occurs once
    # duplicates: dup.svg (= cat_0) and apple1..3 (same title and tags as apple0)
    assert st2["duplicate"] == 4 and st2["tag set over cap"] == 3
    assert sum(p.startswith("animals/") for p in paths) <= 3


def test_build_end_to_end(svg_root, tmp_path) -> None:
    out = tmp_path / "ds"
    stats = build(out, root=svg_root, size=24, n_valid=1, n_test=1, min_freq=2, workers=1)
    assert stats["render_skipped"] == {"blank": 1}
    n = sum(stats["splits"].values())
    assert stats["splits"]["valid"] == 1 and stats["splits"]["test"] == 1 and n >= 3
    recs = [r for s in ("train", "valid", "test") for r in load_dataset(str(out), s)]
    assert len(recs) == n and len({r.id for r in recs}) == n
    for r in recs:
        im = r.load_image()
        assert im.size == (24, 24) and im.mode == "RGB"
        assert im.getpixel((0, 0)) == (255, 255, 255)  # white margin around the drawing
        assert r.meta["source"].startswith("openclipart-svg:")
    again = tmp_path / "ds2"
    rc = main(
        [
            "data",
            "build-openclipart",
            "--out",
            str(again),
            "--root",
            str(svg_root),
            "--size",
            "24",
            "--valid",
            "1",
            "--test",
            "1",
            "--min-freq",
            "2",
            "--workers",
            "1",
        ]
    )
    assert rc == 0
    for s in ("train", "valid", "test"):
        assert (out / f"{s}.jsonl").read_text() == (again / f"{s}.jsonl").read_text()
    assert json.loads((out / "build_stats.json").read_text())["params"]["size"] == 24
