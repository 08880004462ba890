"""Misuse of any subcommand: one line on stderr, exit status 2, no traceback, no run directory;
internal errors keep their traceback; ``-v`` shows it for user errors too."""

from __future__ import annotations

import json

import pytest
import torch

from aimkp.cli import main
from aimkp.errors import DataError


def _usage_error(capsys, argv: list[str]) -> str:
    """Run ``aimkp ARGV``; assert the user-error contract and return the one stderr line."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"aimkp {argv[0]}: error: "), err
    return lines[0]


@pytest.fixture
def one_file(tmp_path):
    p = tmp_path / "posts.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "t", "keyphrases": ["k"]}) + "\n")
    return p


@pytest.mark.parametrize(
    "flags,msg",
    [
        (["--tau-text", "5"], "tau_text must be a finite number in [-1, 1]"),
        (["--tau-image", "-1.5"], "tau_image"),
        (["--max-grad-norm", "0"], "pass 'none' to disable clipping"),
        (["--lora-dropout", "1"], "lora_dropout must be a finite number in [0, 1)"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--lr", "0"], "lr must be a finite number in (0, inf]"),
        (["--projector-lr", "inf"], "projector_lr"),
        (["--model", "/no/such/model"], "no such checkpoint directory"),
        (["--preset", "tiny-gpt"], "neither a preset"),
        (["--resume", "/no/such/run"], "nothing to resume from"),
    ],
)
def test_train_refuses_bad_options_before_any_work(capsys, tmp_path, flags, msg) -> None:
    run = tmp_path / "run"
    line = _usage_error(capsys, ["train", "--data", "synthetic:0", "--output", str(run), *flags])
    assert msg in line
    assert not run.exists()


def test_train_output_under_a_file(capsys, tmp_path) -> None:
    (tmp_path / "f").write_text("x")
    line = _usage_error(capsys, ["train", "--output", str(tmp_path / "f" / "run")])
    assert "is under the file" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(capsys, tmp_path) -> None:
    run = tmp_path / "run"
    line = _usage_error(capsys, ["train", "--device", "cuda", "--output", str(run)])
    assert "CUDA is not available" in line and not run.exists()
    line = _usage_error(
        capsys, ["predict", "--checkpoint", "tiny-llava", "--device", "cuda:0", "--out", "p.txt"]
    )
    assert "CUDA is not available" in line


def test_train_refuses_one_file_as_train_and_valid(capsys, tmp_path, one_file) -> None:
    run = tmp_path / "run"
    line = _usage_error(capsys, ["train", "--data", str(one_file), "--output", str(run)])
    assert "--valid-data" in line and not run.exists()


def test_train_data_error_leaves_no_run_directory(capsys, tmp_path, one_file) -> None:
    """Validation data that cannot be read fails after the loop created OUTPUT: it is removed
    again (with the parent it created), so no empty run directory is left behind."""
    run = tmp_path / "new" / "run"
    bad = tmp_path / "valid.jsonl"
    bad.write_text("{oops\n")
    argv = ["train", "--data", str(one_file), "--valid-data", str(bad), "--output", str(run)]
    line = _usage_error(capsys, argv)
    assert "valid.jsonl:1: invalid JSON" in line
    assert not (tmp_path / "new").exists()


def test_predict_checks_its_output_before_loading_anything(capsys, tmp_path, monkeypatch) -> None:
    import aimkp.models

    def never(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(aimkp.models, "load_model", never)
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "pred.txt"
    line = _usage_error(capsys, ["predict", "--checkpoint", "tiny-llava", "--out", str(out)])
    assert "is under the file" in line
    line = _usage_error(capsys, ["predict", "--checkpoint", "tiny-llava", "--out", str(tmp_path)])
    assert "is a directory" in line
    line = _usage_error(capsys, ["predict", "--checkpoint", str(tmp_path / "no"), "--out", "p"])
    assert "no such checkpoint directory" in line
    argv = ["predict", "--checkpoint", "tiny-llava", "--out", "p", "--decoding", "sample"]
    line = _usage_error(capsys, [*argv, "--temperature", "0"])
    assert "temperature > 0" in line


def test_model_directory_checks(capsys, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "report"
    line = _usage_error(capsys, ["evaluate", "--checkpoint", str(empty), "--output", str(out)])
    assert "no config.json" in line
    (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
    line = _usage_error(capsys, ["evaluate", "--checkpoint", str(empty), "--output", str(out)])
    assert "no aimkp adapter for model_type 'bert'" in line
    assert not out.exists()


def test_tokenizer_that_does_not_match_the_model() -> None:
    from aimkp.errors import UsageError
    from aimkp.models.loading import _check_tokenizer

    model = torch.nn.Module()
    model.get_input_embeddings = lambda: torch.nn.Embedding(10, 2)
    _check_tokenizer("m", model, list(range(10)))
    with pytest.raises(UsageError, match="11 tokens but the model's input embedding has 10 rows"):
        _check_tokenizer("m", model, list(range(11)))


def test_data_errors_in_every_reading_subcommand(capsys, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok", "keyphrases": ["k"]}\n{"text": "caf\xe9", "keyphrases": []}\n')
    want = "bad.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14)"
    assert want in _usage_error(capsys, ["data", "info", "--data", str(bad)])
    assert want in _usage_error(capsys, ["score", "--src", str(bad), "--pred", str(bad)])
    out = tmp_path / "report"
    argv = ["evaluate", "--checkpoint", "tiny-llava", "--data", str(bad), "--output", str(out)]
    assert want in _usage_error(capsys, argv)
    argv = ["predict", "--checkpoint", "tiny-llava", "--data", str(bad), "--out", str(out)]
    assert want in _usage_error(capsys, argv)
    assert not out.exists()


def test_verbose_shows_the_traceback_of_user_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        main(["-v", "score", "--src", str(tmp_path / "no.txt"), "--pred", "p"])
    with pytest.raises(DataError, match="no such data file"):
        main(["score", "--src", str(tmp_path / "no.txt"), "--pred", "p", "-v"])
    with pytest.raises(DataError, match="is not 'default'"):
        main(["data", "info", "--data", str(tmp_path / "none"), "-v"])


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch) -> None:
    """A ValueError that is not a UsageError (a kernel's, a bug's) is not turned into exit 2."""
    import aimkp.metrics

    def broken(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise ValueError("shape mismatch deep inside")

    monkeypatch.setattr(aimkp.metrics, "score", broken)
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"text": "t", "keyphrases": ["k"]}) + "\n")
    pred = tmp_path / "p.txt"
    pred.write_text("k\n")
    with pytest.raises(ValueError, match="deep inside"):
        main(["score", "--src", str(src), "--pred", str(pred)])
