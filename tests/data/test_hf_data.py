"""Hugging Face datasets in and out: records -> to_hf -> save_to_disk -> ``hf:DIR`` -> the same
records; DatasetDict splits; bad rows named by directory, split and row; the convert CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from aimkp.cli import main  # noqa: E402
from aimkp.data import from_hf, load_dataset, to_hf  # noqa: E402
from aimkp.data.record import Record  # noqa: E402


def _pixels(rec: Record) -> np.ndarray | None:
    im = rec.load_image()
    return None if im is None else np.asarray(im)


def _assert_same_records(got, want) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert (g.id, g.text, g.keyphrases) == (w.id, w.text, w.keyphrases)
        pg, pw = _pixels(g), _pixels(w)
        assert (pg is None) == (pw is None), g.id
        if pw is not None:
            assert np.array_equal(pg, pw), g.id


def _with_text_only(recs) -> list[Record]:
    """The default data has an image everywhere: add an image-less and an in-memory one."""
    extra = [
        Record("no-image", "a text-only post", ["text only"]),
        Record("in-memory", "", ["noise"], image=Image.new("RGB", (5, 7), (9, 99, 199))),
    ]
    return list(recs) + extra


def test_round_trip_default_records_through_save_to_disk(tmp_path) -> None:
    want = _with_text_only(load_dataset("default", "test")[:6])
    ds = to_hf(want)
    assert isinstance(ds.features["image"], datasets.Image)
    ds.save_to_disk(str(tmp_path / "ds"))
    got = load_dataset(f"hf:{tmp_path / 'ds'}", "test")  # a bare Dataset serves any split
    _assert_same_records(got, want)
    assert got.stats.read == len(want) and "ds" in got.stats.source
    assert got[0].image_path is None and got[0].image is not None  # embedded, decoded lazily


def test_dataset_dict_with_validation_and_path_strings(tmp_path) -> None:
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "imgs" / "a.png")
    rows = {
        "image": ["imgs/a.png", None],
        "text": ["first", None],
        "keyphrases": [["Spring  Flowers", "bee"], ["tree", "leaf"]],
        "source": ["x", "y"],
    }
    as_strings = {**rows, "keyphrases": ["spring flowers; bee", "tree, leaf"]}
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(as_strings),
            "validation": datasets.Dataset.from_dict(rows),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    recs = load_dataset(f"hf:{tmp_path / 'dd'}", "valid", image_dir=tmp_path)
    assert [r.id for r in recs] == ["0", "1"]
    assert recs[0].keyphrases == ["spring flowers", "bee"] and recs[1].keyphrases == [
        "tree",
        "leaf",
    ]
    assert recs[0].image_path == str(tmp_path / "imgs" / "a.png") and recs[1].text == ""
    assert recs[0].meta == {"source": "x"}
    with pytest.raises(ValueError, match=r"dd: no split 'test' \(the dataset has train, valid"):
        load_dataset(f"hf:{tmp_path / 'dd'}", "test")
    mem = from_hf(dd, "train", with_images=False)  # in-memory DatasetDict, image column ignored
    assert [r.image_path for r in mem] == [None, None]
    assert [r.keyphrases for r in mem] == [r.keyphrases for r in recs]  # "a; b" and "a, b"


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        ({"keyphrases": [[]]}, "empty keyphrase list"),
        ({"keyphrases": [None]}, "'keyphrases' must be a list of strings"),
        ({"keyphrases": [[" ", ""]]}, "empty keyphrase list"),
        ({"image": ["gone.png"]}, "missing image: .*gone.png"),
    ],
)
def test_bad_row_names_directory_split_and_row(tmp_path, cells, message) -> None:
    good = {"image": [None], "text": ["ok"], "keyphrases": [["fine"]]}
    bad = {**good, **cells}
    cols = {k: good[k] + bad[k] for k in good}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(cols)}).save_to_disk(
        str(tmp_path / "bad")
    )
    with pytest.raises(ValueError, match=rf"bad: split 'test', row 1: {message}"):
        load_dataset(f"hf:{tmp_path / 'bad'}", "test")


def test_wrongly_typed_column_names_first_row(tmp_path) -> None:
    ds = datasets.Dataset.from_dict({"text": [3, 4], "keyphrases": [["a"], ["b"]]})
    with pytest.raises(ValueError, match=r"split 'train', row 0: 'text' must be a string or null"):
        from_hf(ds, "train")
    with pytest.raises(ValueError, match=r"<dataset>\[train\]: missing column\(s\) keyphrases"):
        from_hf(ds.remove_columns("keyphrases"), "train")


def test_unreadable_image_bytes_and_skip(tmp_path) -> None:
    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "keyphrases": (getattr(datasets, "List", None) or datasets.Sequence)(
                datasets.Value("string")
            ),
        }
    )
    cols = {
        "image": [{"bytes": b"not an image", "path": None}],
        "text": ["x"],
        "keyphrases": [["y"]],
    }
    datasets.Dataset.from_dict(cols, features=feats).save_to_disk(str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"b: split 'train', row 0: unreadable image bytes"):
        load_dataset(f"hf:{tmp_path / 'b'}", "train")
    recs = load_dataset(f"hf:{tmp_path / 'b'}", "train", on_missing_image="skip")
    assert len(recs) == 0 and recs.stats.skipped["unreadable image"] == 1


def test_convert_cli_to_hf_and_errors(tmp_path, capsys) -> None:
    out = tmp_path / "hf"
    argv = ["data", "convert", "--to", "hf", "--data", "default", "--split", "valid,test"]
    assert main([*argv, "--out", str(out)]) == 0
    dd = datasets.load_from_disk(str(out))
    assert sorted(dd) == ["test", "validation"]
    _assert_same_records(
        load_dataset(f"hf:{out}", "valid")[:5], load_dataset("default", "valid")[:5]
    )
    assert len(load_dataset(f"hf:{out}", "test")) == len(load_dataset("default", "test"))
    capsys.readouterr()
    assert main(["data", "info", "--data", f"hf:{tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing: no such dataset directory" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["data", "info", "--data", f"hf:{tmp_path / 'empty'}"]) == 2
    assert "not a dataset saved with save_to_disk" in capsys.readouterr().err


def test_convert_hf_to_jsonl_writes_embedded_images(tmp_path) -> None:
    want = _with_text_only(load_dataset("default", "test")[:3])
    to_hf(want).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out" / "test.jsonl"
    out.parent.mkdir()
    assert main(["data", "convert", "--data", f"hf:{tmp_path / 'ds'}", "--out", str(out)]) == 0
    got = load_dataset(str(out))
    _assert_same_records(got, want)
    assert got[0].image_path == str(out.parent / "images" / "000000.png")
