"""Streaming prediction: the output policy (refuse / --resume / --overwrite), torn-line repair,
unlabelled posts, bad and over-long posts (skipped with file:line, or one error line), duplicate
ids, ``.txt`` in input order, lazy reading (tiny-llava preset through ``aimkp predict``)."""

from __future__ import annotations

import json
import pathlib

import pytest

from aimkp.cli import main
from aimkp.data.lazy import iter_posts
from aimkp.data.record import ReadStats
from aimkp.errors import DataError, UsageError
from aimkp.eval.streaming import claim_output, read_done_ids

OPENCLIPART = pathlib.Path(__file__).resolve().parents[2] / "aimkp" / "datasets" / "openclipart"


def _posts(tmp_path: pathlib.Path, n: int = 6) -> list[dict]:
    """``n`` unlabelled posts (ids, text, images from the committed dataset), alternately with
    and without an image, of different lengths."""
    lines = (OPENCLIPART / "test.jsonl").read_text().splitlines()[:n]
    posts = []
    for i, line in enumerate(lines):
        src = json.loads(line)
        post = {"id": f"p{i}", "text": src["text"] * (1 + i % 3)}
        if i % 2 == 0:
            post["image"] = str(OPENCLIPART / src["image"])
        posts.append(post)
    return posts


def _write(path: pathlib.Path, rows: list) -> pathlib.Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _predict(data: pathlib.Path, out: pathlib.Path, *extra: str) -> int:
    argv = ["predict", "--checkpoint", "tiny-llava", "--data", str(data), "--out", str(out)]
    return main(argv + ["--max-new-tokens", "4", "--batch-size", "3", "--device", "cpu", *extra])


def _jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Six unlabelled posts predicted to .jsonl and .txt in one go."""
    d = tmp_path_factory.mktemp("full")
    data = _write(d / "posts.jsonl", _posts(d))
    assert _predict(data, d / "pred.jsonl") == 0
    assert _predict(data, d / "pred.txt") == 0
    return data, d / "pred.jsonl", d / "pred.txt"


# ------------------------------------------------------------------ the output policy
def test_existing_output_refused_untouched(tmp_path):
    out = tmp_path / "pred.jsonl"
    out.write_text('{"id": "a"}\n')
    with pytest.raises(UsageError, match="--resume to continue it or --overwrite"):
        claim_output(out, resume=False, overwrite=False)
    assert out.read_text() == '{"id": "a"}\n'
    assert claim_output(out, resume=False, overwrite=True).mode == "overwrite"
    assert claim_output(out, resume=True, overwrite=False).done_ids == {"a"}
    with pytest.raises(UsageError, match="exclude each other"):
        claim_output(out, resume=True, overwrite=True)
    out.write_text("")
    assert claim_output(out, resume=False, overwrite=False).mode == "new"


def test_resume_refused_for_txt(tmp_path):
    with pytest.raises(UsageError, match=r"--resume needs a \.jsonl output"):
        claim_output(tmp_path / "pred.txt", resume=True, overwrite=False)


@pytest.mark.parametrize("tail", ['{"id": "c", "keyph', '{"id": "c", "keyphrases": []}'])
def test_torn_last_line_is_cut(tmp_path, tail):
    out = tmp_path / "pred.jsonl"
    whole = '{"id": "a", "keyphrases": []}\n{"id": "b", "keyphrases": []}\n'
    out.write_text(whole + tail)  # no newline: the write stopped inside (or just after) it
    assert read_done_ids(out) == {"a", "b"}
    assert out.read_text() == whole


def test_bad_line_inside_the_output_is_an_error(tmp_path):
    out = _write(tmp_path / "pred.jsonl", [{"id": "a"}, "not json", {"id": "b"}])
    with pytest.raises(DataError, match=r"pred\.jsonl:2: not a prediction line"):
        read_done_ids(out)
    out = _write(tmp_path / "dup.jsonl", [{"id": "a"}, {"id": "a"}])
    with pytest.raises(DataError, match=r"dup\.jsonl:2: id 'a' written twice"):
        read_done_ids(out)


# ------------------------------------------------------------------ prediction
def test_unlabelled_posts_are_predicted_txt_in_input_order(full_run):
    data, jsonl, txt = full_run
    got = _jsonl(jsonl)
    assert sorted(o["id"] for o in got) == [f"p{i}" for i in range(6)]
    assert all(set(o) == {"id", "keyphrases", "generation"} for o in got)
    by_id = {o["id"]: o["keyphrases"] for o in got}
    assert txt.read_text().splitlines() == [";".join(by_id[f"p{i}"]) for i in range(6)]


def test_resume_after_a_torn_write_completes_the_output(full_run, tmp_path, capsys):
    data, jsonl, _ = full_run
    lines = jsonl.read_text().splitlines(keepends=True)
    out = tmp_path / "pred.jsonl"
    out.write_text("".join(lines[:2]) + lines[2][:15])
    assert _predict(data, out) == 2  # refused without --resume
    assert "--resume" in capsys.readouterr().err
    assert _predict(data, out, "--resume") == 0
    assert "predicted 4 posts, skipped 0, resumed 2" in capsys.readouterr().err
    assert sorted(map(json.dumps, _jsonl(out))) == sorted(map(json.dumps, _jsonl(jsonl)))
    assert _predict(data, out, "--resume") == 0  # finished: nothing is added
    assert "predicted 0 posts, skipped 0, resumed 6" in capsys.readouterr().err
    assert len(_jsonl(out)) == 6


def test_bad_records_skipped_with_location_or_one_error_line(tmp_path, capsys):
    posts = _posts(tmp_path, 3)
    long_post = {"id": "long", "text": "wildflower " * 1500}  # past tiny-llava's 1024 positions
    rows = [posts[0], "{broken json", long_post, posts[1], posts[0] | {"text": "again"}, posts[2]]
    data = _write(tmp_path / "posts.jsonl", rows)
    out = tmp_path / "pred.jsonl"
    assert _predict(data, out, "--on-bad-record", "skip") == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "predicted 3 posts, skipped 3" in last
    # the reader names the repeated id as a bad record at its line (its first place in the message)
    assert f"bad record: 2 [{data}:2, {data}:5]" in last
    assert f"too long: 1 [{data}:3]" in last
    assert sorted(o["id"] for o in _jsonl(out)) == ["p0", "p1", "p2"]

    for bad_line, rows_ in ((2, rows), (1, [long_post, posts[0]])):
        data = _write(tmp_path / f"bad{bad_line}.jsonl", rows_)
        assert _predict(data, tmp_path / f"bad{bad_line}.out.jsonl") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{data}:{bad_line}:" in err[0], err


def test_too_long_error_comes_before_generation(tmp_path, capsys):
    """In --on-bad-record error mode an over-long post stops the run before its window is
    generated: nothing of that window is written, not even an empty file."""
    rows = _posts(tmp_path, 3) + [{"id": "long", "text": "spring " * 1500}]
    data = _write(tmp_path / "posts.jsonl", rows)
    out = tmp_path / "pred.jsonl"
    assert _predict(data, out) == 2
    assert f"{data}:4: the post is" in capsys.readouterr().err
    assert not out.exists()


def test_iter_posts_is_lazy_and_locates_posts(tmp_path):
    rows = [{"id": "a", "text": "x"}, "", {"id": "b", "text": "y", "keyphrases": None}]
    data = _write(tmp_path / "posts.jsonl", rows)
    stats = ReadStats()
    it = iter_posts(str(data), stats=stats)
    first = next(it)
    assert (first.where, first.record.id, first.record.keyphrases) == (f"{data}:1", "a", [])
    assert stats.read == 1  # only what was consumed has been read
    assert [p.where for p in it] == [f"{data}:3"]
    assert stats.skipped == {"blank line": 1}
    with pytest.raises(DataError, match="no 'keyphrases'"):
        list(iter_posts(str(data), labelled=True))


def test_iter_posts_cmkp_unlabelled(tmp_path):
    data = tmp_path / "test_src.txt"
    data.write_text("a post<sep><sep>\nanother<sep>kp one;kp two\n")
    posts = list(iter_posts(str(data), with_images=False))
    assert [(p.where, p.record.keyphrases) for p in posts] == [
        (f"{data}:1", []),
        (f"{data}:2", ["kp one", "kp two"]),
    ]


def test_iter_posts_hf_unlabelled(tmp_path):
    pytest.importorskip("datasets")
    from aimkp.data import Record
    from aimkp.data.hf import save_hf

    recs = [Record("a", "first post", []), Record("b", "second post", ["kp"])]
    save_hf({"test": recs}, tmp_path / "ds")
    posts = list(iter_posts(f"hf:{tmp_path / 'ds'}", "test"))
    assert [(p.record.id, p.record.keyphrases) for p in posts] == [("a", []), ("b", ["kp"])]
    assert posts[1].where == f"{tmp_path / 'ds'}: split 'test', row 1"


def test_ctrl_c_keeps_whole_batches_and_says_how_to_finish(full_run, tmp_path, monkeypatch, capsys):
    from aimkp.eval.predict import Predictor

    data, jsonl, _ = full_run
    calls = []
    real = Predictor.generate_batch

    def interrupted_after_one_batch(self, samples):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(samples))
        return real(self, samples)

    monkeypatch.setattr(Predictor, "generate_batch", interrupted_after_one_batch)
    out = tmp_path / "pred.jsonl"
    assert _predict(data, out) == 130
    assert "interrupted; rerun with --resume" in capsys.readouterr().err
    written = _jsonl(out)
    assert len(written) == calls[0] == 3
    assert all(o in _jsonl(jsonl) for o in written)
