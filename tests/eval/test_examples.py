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


def test_too_few_predictions_is_a_user_error(tmp_path, capsys) -> None:
    pred = tmp_path / "p.txt"
    pred.write_text("cat\n")
    assert main(["--predictions", str(pred), "--data", "default", "-n", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 prediction lines for 3 posts" in err[0]
    assert main(["--predictions", str(pred), "--data", "default", "-n", "1"]) == 0
    assert "  predicted: cat" in capsys.readouterr().out
