"""Readers on malformed input: bad UTF-8 named by file:line, images decoded in full, bad records
skipped and counted on request, and a fuzzer: any bytes either read or raise DataError."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from aimkp.data import load_dataset, read_records
from aimkp.errors import DataError


def _png(path, size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def _truncated_png(path) -> None:
    """A PNG cut short: its header (and size) read fine, its pixels do not."""
    data = _png(path)
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as im:
        assert im.size == (16, 12)  # what a header-only check saw


@pytest.fixture
def posts_with_a_cut_image(tmp_path):
    _png(tmp_path / "good.png")
    _truncated_png(tmp_path / "cut.png")
    rows = [
        {"id": "g", "text": "good", "keyphrases": ["a"], "image": "good.png"},
        {"id": "c", "text": "cut", "keyphrases": ["b"], "image": "cut.png"},
    ]
    p = tmp_path / "test.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_a_truncated_image_is_caught_when_read(posts_with_a_cut_image) -> None:
    with pytest.raises(DataError, match=r"test.jsonl:2: unreadable image: .*cut.png"):
        read_records(posts_with_a_cut_image)
    recs = read_records(posts_with_a_cut_image, on_missing_image="skip")
    assert [r.id for r in recs] == ["g"]
    assert dict(recs.stats.skipped) == {"unreadable image": 1}
    assert recs[0].load_image().size == (16, 12)


def test_data_info_and_predict_skip_and_count_the_cut_image(
    posts_with_a_cut_image, tmp_path, capsys
) -> None:
    from aimkp.cli import main

    src = str(posts_with_a_cut_image)
    assert main(["data", "info", "--data", src]) == 2
    assert "test.jsonl:2: unreadable image" in capsys.readouterr().err
    assert main(["data", "info", "--data", src, "--on-missing-image", "skip"]) == 0
    assert "skipped 1 (unreadable image: 1" in capsys.readouterr().out
    out = tmp_path / "pred.txt"
    argv = ["predict", "--checkpoint", "tiny-llava", "--data", src, "--out", str(out)]
    assert main([*argv, "--max-new-tokens", "2", "--device", "cpu"]) == 2
    assert "unreadable image" in capsys.readouterr().err and not out.exists()
    rc = main([*argv, "--max-new-tokens", "2", "--device", "cpu", "--on-missing-image", "skip"])
    assert rc == 0
    assert "skipped 1 (unreadable image: 1" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 1


def test_train_split_reading_follows_the_config(posts_with_a_cut_image, tmp_path, capsys) -> None:
    from aimkp.train.config import TrainConfig
    from aimkp.train.data import load_split

    valid = tmp_path / "valid.jsonl"
    valid.write_text(json.dumps({"id": "v", "text": "t", "keyphrases": ["k"]}) + "\n{bad\n")
    cfg = TrainConfig(data=str(posts_with_a_cut_image), valid_data=str(valid))
    with pytest.raises(DataError, match="unreadable image"):
        load_split(cfg, "train")
    cfg = TrainConfig(
        data=str(posts_with_a_cut_image),
        valid_data=str(valid),
        on_missing_image="skip",
        on_bad_record="skip",
    ).validate()
    assert [r.id for r in load_split(cfg, "train")] == ["g"]
    assert "train: " in capsys.readouterr().err  # the skip is printed, not silent
    assert [r.id for r in load_split(cfg, "valid")] == ["v"]
    assert [r.id for r in load_split(cfg, "test")] == ["v"]  # never the training file
    assert "bad record: 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name,content,where",
    [
        ("c.txt", b"ok<sep>a<sep>\ncaf\xe9 au lait<sep>b\n", "c.txt:2: not valid UTF-8 (byte 0xe9"),
        ("c.jsonl", b'{"text": "t", "keyphrases": ["\xff"]}\n', "c.jsonl:1: not valid UTF-8"),
        (
            "c.json",
            b'[\n {"text": "t", "keyphrases": ["k"]},\n {"text": "\xc3\x28"}]',
            "c.json:3: not valid UTF-8 (byte 0xc3",
        ),
    ],
)
def test_bad_utf8_names_file_and_line(tmp_path, name, content, where) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=where.replace("(", r"\(")):
        read_records(p)


def test_bad_utf8_in_predictions_names_the_line(tmp_path) -> None:
    from aimkp.metrics import read_predictions

    p = tmp_path / "p.txt"
    p.write_bytes(b"a;b\nc\xe9\n")
    with pytest.raises(DataError, match=r"p.txt:2: not valid UTF-8 \(byte 0xe9\)"):
        read_predictions(p)


def test_bad_records_skipped_reported_and_counted(tmp_path, caplog) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        b'{"id": "1", "text": "t", "keyphrases": ["k"]}\n'
        b"{oops\n"
        b'{"id": "3", "text": "t"}\n'
        b'{"id": "4", "text": "\xe9", "keyphrases": ["k"]}\n'
        b'{"id": "5", "text": "t", "keyphrases": "a; b"}\n'
    )
    with pytest.raises(DataError, match="d.jsonl:2: invalid JSON"):
        read_records(p)
    with caplog.at_level(logging.WARNING, logger="aimkp.data"):
        recs = read_records(p, on_bad_record="skip")
    assert [r.id for r in recs] == ["1", "5"]
    assert recs.stats.skipped["bad record"] == 3
    assert recs.stats.examples["bad record"] == [f"{p}:2", f"{p}:3", f"{p}:4"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and all(f"{p}:" in w for w in warned)
    assert "skipped 3 (bad record: 3" in recs.stats.summary()


def test_bad_records_in_cmkp_and_json_arrays(tmp_path) -> None:
    c = tmp_path / "c.txt"
    c.write_text("a<sep>x\nno separator here\nb<sep>\nd<sep>y\n")
    recs = read_records(c, on_bad_record="skip")
    assert [r.text for r in recs] == ["a", "d"] and recs.stats.skipped["bad record"] == 2
    j = tmp_path / "a.json"
    j.write_text(
        json.dumps([{"text": "a", "keyphrases": ["x"]}, 7, {"text": "b"}, {"keyphrases": "y"}])
    )
    recs = read_records(j, on_bad_record="skip")
    assert [r.keyphrases for r in recs] == [["x"], ["y"]]
    assert recs.stats.skipped["bad record"] == 2
    j.write_text('[{"text": "a", "keyphrases": ["x"]}, {"text": ')  # the array itself breaks
    with pytest.raises(DataError, match="a.json:1: record 1: invalid JSON"):
        read_records(j, on_bad_record="skip")


def test_missing_images_follow_on_missing_image_not_on_bad_record(tmp_path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "t", "keyphrases": ["k"], "image": "gone.png"}) + "\n")
    with pytest.raises(DataError, match="missing image"):
        read_records(p, on_bad_record="skip")
    assert read_records(p, on_missing_image="skip").stats.skipped["missing image"] == 1


def test_the_data_cli_skips_bad_records(tmp_path, capsys) -> None:
    from aimkp.cli import main

    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "t", "keyphrases": ["k"]}\n[1, 2]\n')
    assert main(["data", "info", "--data", str(p)]) == 2
    assert "d.jsonl:2: expected a JSON object" in capsys.readouterr().err
    assert main(["data", "info", "--data", str(p), "--on-bad-record", "skip"]) == 0
    assert "skipped 1 (bad record: 1 [" in capsys.readouterr().out


def test_default_dataset_images_all_decode() -> None:
    recs = load_dataset("default", "valid")
    assert recs.stats.total_skipped == 0 and all(r.has_image for r in recs)


# ---- fuzzing: whatever the bytes, a reader returns records or raises DataError naming the file

_LINES = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from(
            [
                b'{"text": "t", "keyphrases": ["k"]}',
                b'{"text": "t", "keyphrases": ["k"], "image": "x\\u0000y"}',
                b'{"text": 1, "keyphrases": ["k"]}',
                b'{"keyphrases": [1]}',
                b'{"conversations": [{"from": "gpt"}]}',
                b'{"conversations": "no"}',
                b'{"text": "t", "keyphrases": ["k"], "image": 3}',
                b"text<sep>kp1;kp2<sep>http://h/i.jpg",
                b"text<sep>kp1;kp2",
                b"text|kp1|kp2",
                b"a<sep>b<sep>c<sep>d",
                b"[" * 3000,
                b"1" * 5000,
                b"\xe9\xff\xfe",
                b'{"text": "t", "keyphrases": ["k"]',
                b"null",
                b"[]",
                b",",
                b"]",
                b"",
            ]
        ),
    ),
    max_size=8,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=_LINES,
    sep=st.sampled_from([b"\n", b"\r\n", b"\r", b",\n", b", "]),
    ext=st.sampled_from([".txt", ".jsonl", ".json"]),
    wrap=st.booleans(),
    cut=st.integers(min_value=0, max_value=400),
    skip=st.booleans(),
)
def test_readers_fuzzed(tmp_path_factory, lines, sep, ext, wrap, cut, skip) -> None:
    body = sep.join(lines)
    if wrap:
        body = b"[" + body + b"]"
    body = body[: len(body) - cut % (len(body) + 1)] if cut % 3 == 0 else body  # truncated
    p = tmp_path_factory.mktemp("fuzz") / f"f{ext}"
    p.write_bytes(body)
    policy = "skip" if skip else "error"
    try:
        recs = read_records(p, on_bad_record=policy, on_missing_image="skip")
    except DataError as exc:
        assert f"{p}:" in str(exc)  # file:line (a JSON array: the line its record starts on)
        return
    for r in recs:
        assert (
            isinstance(r.text, str)
            and r.keyphrases
            and all(isinstance(k, str) for k in r.keyphrases)
        )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=200))
def test_prediction_files_fuzzed(tmp_path_factory, body) -> None:
    from aimkp.metrics import read_predictions

    p = tmp_path_factory.mktemp("pred") / "p.txt"
    p.write_bytes(body)
    try:
        preds = read_predictions(p)
    except DataError as exc:
        assert f"{p}:" in str(exc) and "not valid UTF-8" in str(exc)
        return
    assert all(isinstance(k, str) and k for line in preds for k in line)
