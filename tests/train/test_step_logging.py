"""Per-step logging of ``aimkp train`` (``--logging-steps N`` -> ``OUTPUT/steps.csv``) and
``--report-to`` (wandb through a stand-in module; a missing package is a one-line error)."""

from __future__ import annotations

import csv
import importlib.machinery
import pathlib
import sys
import types

import pytest
import torch

from aimkp.cli import main
from aimkp.errors import UsageError
from aimkp.runs import reporting
from aimkp.runs.step_log import COLUMNS, StepLog
from aimkp.train.config import TrainConfig


class FakeWandb(types.ModuleType):
    """Records ``wandb.init(...)`` and ``run.log(scalars, step=)`` calls."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, scalars: dict, step: int) -> None:
        self.logged.append((scalars, step))

    def finish(self) -> None:
        self.finished = True


def test_steps_csv_and_wandb(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aimkp.train.loop import train

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(reporting, "_installed", lambda m: m == "wandb")
    out = tmp_path / "run"
    cfg = TrainConfig(model="tiny-llava", data="default", max_train_samples=8, epochs=2,
                      batch_size=2, grad_accum=2, lr=1e-3, eval_every_epoch=False, seed=1,
                      logging_steps=1, report_to="wandb", num_threads=1, output=str(out),
                      lora_r=4, lora_alpha=8)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # 8 posts / 4 per step, 2 epochs
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2]
    for r in rows:
        assert 0 < float(r["loss"]) < 50 and float(r["tokens_per_s"]) > 0
        assert float(r["grad_norm"]) > 0 and float(r["lr"]) >= 0 and r["skipped_steps"] == "0"
    assert float(rows[0]["lr"]) > float(rows[2]["lr"]) > 0  # the schedule after each step
    assert rows[0]["text_kept_rate"] == ""  # first visits: strides 1, no masked copy yet
    assert 0.0 <= float(rows[3]["text_kept_rate"]) <= 1.0  # the second epoch filters copies
    epoch_loss = [float(r["train_loss"]) for r in csv.DictReader((out / "metrics.csv").open())]
    first = [float(r["loss"]) for r in rows[:2]]  # the epoch's loss weighs its steps' losses
    assert min(first) - 1e-9 <= epoch_loss[0] <= max(first) + 1e-9
    step_logs = [(s, step) for s, step in fake.logged if "step/loss" in s]
    assert [step for _, step in step_logs] == [1, 2, 3, 4]
    assert step_logs[1][0]["step/grad_norm"] == pytest.approx(float(rows[1]["grad_norm"]))
    assert any("train_loss" in s for s, _ in fake.logged)  # the epoch rows too
    assert fake.init_kwargs["config"]["logging_steps"] == 1 and fake.finished


class Recorder(reporting.Reporter):
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.logged.append((scalars, step))


def test_step_log_appends_one_header_and_reports_the_numbers(tmp_path: pathlib.Path) -> None:
    rec = Recorder()
    row = dict(zip(COLUMNS, (2, 1, 0.5, 1e-3, 10.0, "", 0.5, "", 0), strict=True))
    StepLog(tmp_path, rec).write(row)
    StepLog(tmp_path, rec).write({**row, "step": 4})  # a resumed run continues the file
    StepLog(tmp_path, rec, enabled=False).write({**row, "step": 6})  # ranks other than 0
    lines = (tmp_path / "steps.csv").read_text().splitlines()
    assert lines == [",".join(COLUMNS), "2,1,0.5,0.001,10.0,,0.5,,0", "4,1,0.5,0.001,10.0,,0.5,,0"]
    numbers = {
        "step/epoch": 1.0,
        "step/loss": 0.5,
        "step/lr": 1e-3,
        "step/tokens_per_s": 10.0,
        "step/image_kept_rate": 0.5,
        "step/skipped_steps": 0.0,
    }
    assert rec.logged == [(numbers, 2), (numbers, 4)]


def test_report_to_a_missing_package_is_one_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reporting, "_installed", lambda m: False)
    run = tmp_path / "run"
    assert main(["train", "--report-to", "tensorboard", "--output", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the tensorboard package" in err[0]
    assert not run.exists()
    assert isinstance(reporting.make_reporter("auto", tmp_path), reporting.Reporter)
    with pytest.raises(UsageError, match="wandb"):
        reporting.make_reporter("wandb", tmp_path)


def test_logging_steps_must_be_positive() -> None:
    with pytest.raises(UsageError, match="logging_steps"):
        TrainConfig(logging_steps=0).validate()
