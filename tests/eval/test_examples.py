"""``python -m aimkp.eval.examples``: posts with true and predicted keyphrases, hits marked."""

from __future__ import annotations

from aimkp.data import Record
from aimkp.eval.examples import format_examples, main


def test_hits_are_marked_and_long_texts_cut() -> None:
    recs = [Record("a", "x" * 100, ["Cat", "dog"]), Record("b", "", ["sun"], image_path="b.png")]
    out = format_examples(recs, [["cat", "bird"], []], n=5, width=20).splitlines()
    assert out[0] == "post a: '" + "x" * 17 + "...' (no image)"
    assert out[1:3] == ["  true:      Cat, dog", "  predicted: cat [ok], bird"]
    assert out[3] == "post b: ''" and out[5] == "  predicted: (nothing)"


def test_predictions_cover_the_first_posts_only(tmp_path, capsys) -> None:
    pred = tmp_path / "p.txt"
    pred.write_text("cat\n")
    assert main(["--predictions", str(pred), "--data", "default", "-n", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[2] == "  predicted: cat"  # one post shown, the one predicted
    pred.write_text("cat\n" * 251)  # the default test split has 250 posts
    assert main(["--predictions", str(pred), "--data", "default"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "251 prediction lines for a split of 250 posts" in err[0]
