"""Reading a training state back runs no code: only tensors, numbers, strings, containers and the
numpy RNG state's array are built; anything else is refused before it can act."""

from __future__ import annotations

import pathlib
import random

import numpy as np
import pytest
import torch

from aimkp.errors import CheckpointError
from aimkp.method.pmm import StrideTable
from aimkp.runs.state import read_train_state, restore_train_state, save_train_state
from aimkp.train.config import TrainConfig
from aimkp.train.loop import build_scheduler

MARKER_NAME = "pwned"


def _write_marker(path: str) -> None:  # what a hostile pickle would call
    pathlib.Path(path).write_text("code ran")


class _Hostile:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (_write_marker, (self.marker,))


def _training_objects():  # noqa: ANN202
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(
        [{"params": [model.weight], "lr": 1e-3}, {"params": [model.bias], "lr": 1e-4}]
    )
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = build_scheduler(opt, 10, 2)
    strides = StrideTable(5)
    return model, opt, sched, strides


def _save(directory: pathlib.Path) -> pathlib.Path:
    model, opt, sched, strides = _training_objects()
    history = [{"epoch": 1, "train_loss": 2.5, "text_kept_rate": float("nan"), **strides.summary()}]
    return save_train_state(
        directory,
        model=model,
        optimizer=opt,
        scheduler=sched,
        strides=strides,
        epoch=1,
        step=3,
        best_score=12.5,
        best_epoch=1,
        history=history,
        config=TrainConfig().to_dict(),
    )


def test_a_state_written_by_aimkp_loads_and_restores(tmp_path) -> None:
    random.random()
    np.random.rand()
    _save(tmp_path / "last")
    want_np = np.random.rand()
    st = read_train_state(tmp_path)  # the run directory: finds last/train_state.pt
    assert (st["epoch"], st["step"], st["best_score"], st["config"]["lr"]) == (1, 3, 12.5, 2e-4)
    assert isinstance(st["rng"]["numpy"][1], np.ndarray)
    model, opt, sched, strides = _training_objects()
    restore_train_state(
        st, model=model, optimizer=opt, scheduler=sched, strides=strides, check_frozen=False
    )
    assert np.random.rand() == want_np  # the numpy RNG state came back from the file
    assert opt.state_dict()["param_groups"][1]["lr"] == st["optimizer"]["param_groups"][1]["lr"]


def test_a_state_that_carries_code_is_refused_and_the_code_never_runs(tmp_path) -> None:
    marker = tmp_path / MARKER_NAME
    run = tmp_path / "run" / "last"
    path = _save(run)
    state = torch.load(path, weights_only=False)  # the test's own file: safe to read here
    state["history"].append({"note": _Hostile(marker)})
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"train_state.pt: refused: .*_write_marker"):
        read_train_state(run)
    assert not marker.exists()
    # the hostile object really would run its code under an unrestricted load
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_unreadable_state_files(tmp_path) -> None:
    (tmp_path / "train_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"refused: it holds something \(corrupt"):
        read_train_state(tmp_path)
    _save(tmp_path)
    data = (tmp_path / "train_state.pt").read_bytes()
    (tmp_path / "train_state.pt").write_bytes(data[: len(data) // 2])  # cut short
    with pytest.raises(CheckpointError, match="cannot read the training state"):
        read_train_state(tmp_path)
    torch.save([1, 2], tmp_path / "train_state.pt")
    with pytest.raises(CheckpointError, match="not a training state written by aimkp"):
        read_train_state(tmp_path)
    with pytest.raises(CheckpointError, match="nothing to resume from"):
        read_train_state(tmp_path / "none")


def test_model_directories_load_safetensors_weights_only(tmp_path) -> None:
    """A checkpoint directory whose weights are a pickle (``pytorch_model.bin``) is refused and
    the pickle never opened."""
    from aimkp.models import load_model
    from aimkp.models.presets import build_preset

    model, _, _ = build_preset("tiny-llava", ["a b c"])
    model.config.save_pretrained(tmp_path)
    marker = tmp_path / MARKER_NAME
    torch.save({"w": _Hostile(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors weights only"):
        load_model(tmp_path)
    assert not marker.exists()
