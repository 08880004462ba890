"""What ``--resume`` may change: every differing option is named (saved and given value, all on
one line) before anything loads; ``--allow-changed`` accepts the safe ones and records them;
``aimkp train --resume DIR`` alone continues in DIR with the saved options."""

from __future__ import annotations

import csv

import pytest
import torch

from aimkp.errors import UsageError
from aimkp.runs.resume_check import check_resume_options, resumed_fields
from aimkp.train.config import TrainConfig

SAVED = TrainConfig(max_train_samples=4, lr=1e-3, epochs=2).to_dict()


def _given(**kw) -> TrainConfig:
    return TrainConfig(**{**SAVED, "resume": "runs/x", **kw})


def test_same_options_resume_and_per_invocation_ones_are_not_compared() -> None:
    assert check_resume_options(SAVED, _given(stop_after_epochs=1, output="elsewhere")) == []


def test_changed_max_train_samples_is_named_not_a_frozen_base_mismatch() -> None:
    with pytest.raises(UsageError, match=r"max_train_samples: saved 4, given 8"):
        check_resume_options(SAVED, _given(max_train_samples=8))


def test_every_refused_change_is_listed_on_one_line() -> None:
    with pytest.raises(UsageError) as info:
        check_resume_options(SAVED, _given(lr=2e-3, batch_size=4, seed=1))
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("lr: saved 0.001, given 0.002", "batch_size: saved 8, given 4", "seed: saved 0"):
        assert part in msg
    assert "--allow-changed lr" in msg and "batch_size, seed cannot change" in msg


def test_allow_changed_accepts_safe_options_only() -> None:
    got = check_resume_options(SAVED, _given(lr=2e-3, epochs=3, allow_changed=("lr", "epochs")))
    assert got == ["epochs: 2 -> 3", "lr: 0.001 -> 0.002"]  # field order
    with pytest.raises(UsageError, match="grad_accum cannot change"):
        check_resume_options(SAVED, _given(grad_accum=2, allow_changed=("grad_accum",)))
    with pytest.raises(UsageError, match="unknown option"):
        check_resume_options(SAVED, _given(allow_changed=("lrr",)))


def test_resume_alone_takes_the_saved_options() -> None:
    given = TrainConfig(resume="runs/x", lr=5e-3).to_dict()
    fields = resumed_fields(given, {"resume", "lr"}, SAVED, "runs/x")
    assert fields["max_train_samples"] == 4 and fields["epochs"] == 2  # saved
    assert fields["lr"] == 5e-3 and fields["output"] == "runs/x"  # given / the resumed dir


def test_cli_resume_dir_alone_continues_and_records_allowed_changes(tmp_path, capsys) -> None:
    from aimkp.cli import main

    n = torch.get_num_threads()
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny-llava", "--max-train-samples", "4", "--batch-size", "2",
            "--no-eval", "--lora-r", "4", "--threads", "1", "--epochs", "1",
            "--output", str(out)]  # fmt: skip
    try:
        assert main(args) == 0
        assert main(["train", "--resume", str(out), "--epochs", "2"]) == 2  # refused: named
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("aimkp")]
        assert "epochs: saved 1, given 2" in err[-1] and "--allow-changed epochs" in err[-1]
        code = main(["train", "--resume", str(out), "--epochs", "2", "--allow-changed", "epochs"])
    finally:
        torch.set_num_threads(n)
    assert code == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[1]["resumed"] == "epochs: 1 -> 2" and rows[0]["resumed"] == ""
    assert TrainConfig.load(out / "config.json").max_train_samples == 4  # the saved option
