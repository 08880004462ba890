"""The training loop end to end on tiny-llava and the default data: exact resume, the CLI with
evaluation / best checkpoint / metrics.csv, and a checkpoint that prediction can load."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from aimkp.runs.state import read_train_state
from aimkp.train.config import TrainConfig
from aimkp.train.loop import train


def _cfg(out, **kw) -> TrainConfig:
    base = dict(
        model="tiny-llava",
        data="default",
        output=str(out),
        epochs=2,
        batch_size=3,
        grad_accum=2,
        max_train_samples=10,
        eval_max_samples=4,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,  # dropout on: resume must restore the RNG stream exactly
        lr=5e-3,
        projector_lr=1e-3,
        tau_image=0.8,
        eval_every_epoch=False,
        max_new_tokens=4,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_two_epochs_equal_one_plus_resume_plus_one(tmp_path) -> None:
    full = train(_cfg(tmp_path / "full"))
    part = train(_cfg(tmp_path / "part", stop_after_epochs=1))
    assert part["steps"] == full["steps"] // 2
    resumed = train(_cfg(tmp_path / "part", resume=str(tmp_path / "part")))
    assert resumed["steps"] == full["steps"]
    a, b = _trainable(full["model"]), _trainable(resumed["model"])
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        assert torch.equal(a[n], b[n]), n  # bit-exact: same ops, same order, same RNG
    st_full = read_train_state(tmp_path / "full")  # loop-written states load safely
    st_res = read_train_state(tmp_path / "part")
    assert torch.equal(st_full["strides"]["text"], st_res["strides"]["text"])
    assert torch.equal(st_full["strides"]["image"], st_res["strides"]["image"])
    assert st_full["step"] == st_res["step"] == full["steps"]
    rows = list(csv.DictReader(open(tmp_path / "part" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_resume_onto_other_base_model_fails(tmp_path) -> None:
    train(_cfg(tmp_path / "a", epochs=1, max_train_samples=3))
    with pytest.raises(ValueError, match="seed: saved 3, given 4"):  # named before loading
        train(
            _cfg(tmp_path / "a", epochs=1, max_train_samples=3, seed=4, resume=str(tmp_path / "a"))
        )
    with pytest.raises(ValueError, match="nothing to resume"):
        train(_cfg(tmp_path / "b", resume=str(tmp_path / "nothing")))


def test_cli_train_eval_best_and_predict(tmp_path, capsys) -> None:
    from aimkp.cli import main
    from aimkp.eval.predict import load_predictor

    out = tmp_path / "run"
    rc = main(
        [
            "train", "--preset", "tiny-llava", "--data", "default", "--output", str(out),
            "--epochs", "2", "--batch-size", "4", "--max-train-samples", "8",
            "--eval-max-samples", "3", "--lora-r", "4", "--lora-alpha", "8",
            "--max-new-tokens", "4", "--baselines", "--method", "sft",
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "majority" in text and "untrained" in text and "trained (best)" in text
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 2 and "valid_F1@1" in rows[0] and "tokens_per_s" in rows[0]
    assert json.loads((out / "config.json").read_text())["method"] == "sft"
    for d in ("best", "last"):  # LoRA: peft adapters naming the preset's base, saved once
        assert (out / d / "aimkp.json").is_file() and (out / d / "adapter_config.json").is_file()
        assert not (out / d / "model.safetensors").exists()
    assert (out / "base" / "model.safetensors").is_file()
    preds = load_predictor(str(out / "best"), max_new_tokens=4).predict(
        __import__("aimkp.data", fromlist=["x"]).load_dataset("default", "test")[:2]
    )
    assert len(preds) == 2 and all(isinstance(p, list) for p in preds)


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2vl", "tiny-idefics3"])
def test_projector_gets_projector_lr(preset: str) -> None:
    """The adapter's projector (LLaVA projector, Qwen merger, Idefics3 connector) trains at
    projector_lr, every other trainable parameter (LoRA factors) at lr."""
    from aimkp.models import load_model
    from aimkp.models.lora import apply_lora
    from aimkp.train.loop import build_optimizer

    loaded = load_model(preset)
    apply_lora(loaded, r=4, alpha=8)
    cfg = TrainConfig(lr=1e-3, projector_lr=1e-5)
    opt = build_optimizer(loaded.model, cfg, loaded.adapter.projector)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    proj = {id(p) for p in loaded.adapter.projector.parameters() if p.requires_grad}
    trainable = {id(p) for p in loaded.model.parameters() if p.requires_grad}
    assert proj and by_lr[1e-5] == proj
    assert by_lr[1e-3] == trainable - proj


def test_epoch_stats_add_and_row() -> None:
    """EpochStats sums micro-steps by field; rates are NaN when no copy of that kind was made."""
    import math

    from aimkp.method.gf import decide
    from aimkp.method.pmm import TEXT, Copy
    from aimkp.method.step import StepResult
    from aimkp.train.stats import EpochStats

    rows = [Copy(0, None, 1), Copy(0, TEXT, 2), Copy(1, None, 1), Copy(1, TEXT, 2)]
    d = decide(rows, torch.tensor([0.5, -0.5]), 6.0)
    stats = EpochStats()
    stats.add(StepResult(2.0, 2, 4, 6, 40, decision=d))
    stats.add(StepResult(1.0, 1, 1, 2, 9))  # an SFT step: no decision
    assert (stats.text_copies, stats.text_kept, stats.image_copies) == (2, 1, 0)
    assert stats.train_loss == pytest.approx((2.0 * 6 + 1.0 * 2) / 8)
    row = stats.as_row(epoch=1, step=5, lr=1e-3, seconds=2.0, n_samples=3)
    assert list(row)[:4] == ["epoch", "step", "train_loss", "lr"]
    assert row["tokens_per_s"] == 49 / 2.0 and row["text_kept_rate"] == 0.5
    assert math.isnan(row["image_kept_rate"]) and row["grand_pruned"] == 0
