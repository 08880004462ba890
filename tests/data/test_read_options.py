"""The reader options are one definition: every reader takes the same keywords, with the same
defaults, and names a bad value the same way."""

from __future__ import annotations

import dataclasses
import json

import pytest

from aimkp.data import from_hf, iter_records, load_dataset, read_records
from aimkp.data.lazy import iter_posts
from aimkp.data.options import ReadKwargs, ReadOptions, reader_options
from aimkp.errors import DataError


def test_the_keywords_are_the_fields_of_read_options() -> None:
    assert list(ReadKwargs.__annotations__) == [f.name for f in dataclasses.fields(ReadOptions)]
    opts = ReadOptions()
    assert (opts.image_dir, opts.on_missing_image, opts.on_bad_record) == (None, "error", "error")
    assert opts.with_images and opts.check_images


@pytest.fixture
def posts(tmp_path):
    p = tmp_path / "posts.jsonl"
    rows = [{"id": "a", "text": "t", "keyphrases": ["k"], "image": "gone.png"}, "not an object"]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _readers(path):
    """Each reader of one file, as a function of the reader keywords."""
    return [
        lambda **kw: list(iter_records(path, **kw)),
        lambda **kw: read_records(path, **kw),
        lambda **kw: load_dataset(str(path), "test", **kw),
        lambda **kw: list(iter_posts(str(path), "test", **kw)),
    ]


@pytest.mark.parametrize("reader", range(4))
def test_every_reader_takes_and_checks_the_options(posts, reader) -> None:
    read = _readers(posts)[reader]
    with pytest.raises(DataError, match="on_missing_image must be 'error' or 'skip', got 'x'"):
        read(on_missing_image="x")
    with pytest.raises(DataError, match=r"on_bad_record must be one of \('error', 'skip'\)"):
        read(on_bad_record="x")
    with pytest.raises(DataError, match=r"posts.jsonl:1: missing image"):
        read(on_bad_record="skip")
    assert len(read(on_bad_record="skip", on_missing_image="skip")) == 0
    assert len(read(on_bad_record="skip", with_images=False)) == 1
    with pytest.raises(TypeError, match="image_size"):
        read(image_size=4)


def test_from_hf_checks_the_options() -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["t"], "keyphrases": [["k"]], "image": ["gone.png"]})
    with pytest.raises(DataError, match="on_missing_image must be 'error' or 'skip'"):
        from_hf(ds, on_missing_image="x")
    with pytest.raises(DataError, match="on_bad_record must be one of"):
        from_hf(ds, on_bad_record="x")
    assert len(from_hf(ds, on_missing_image="skip")) == 0
    assert len(from_hf(ds, with_images=False)) == 1


def test_reader_options_for_a_spec() -> None:
    assert reader_options("synthetic:3", image_dir="imgs") == {}
    assert reader_options("posts.jsonl", image_dir="imgs", with_images=False) == {
        "image_dir": "imgs",
        "with_images": False,
    }
