"""TrainConfig validation, CLI flags and --quick precedence; LR schedule; majority baseline."""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import pytest

from aimkp.cli import train as cli_train
from aimkp.errors import UsageError
from aimkp.train.config import TrainConfig
from aimkp.train.loop import build_scheduler, majority_keyphrases


def _parse(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser()
    cli_train.add_arguments(p)
    args = p.parse_args(argv)
    return cli_train.config_from_args(args)


def test_defaults_are_the_paper_setup() -> None:
    c = TrainConfig().validate()
    assert (c.lr, c.projector_lr, c.warmup_ratio, c.weight_decay) == (2e-4, 2e-5, 0.03, 0.0)
    assert (c.lora_r, c.lora_alpha, c.lora_dropout) == (128, 256, 0.05)
    assert (c.tau_text, c.tau_image, c.method, c.mask_mode) == (0.1, 0.4, "aimkp", "compact")
    # compact by default (the layout of the rows follows the attention implementation)
    assert c.resolved_mask_mode() == "compact"
    assert TrainConfig(mask_mode="auto").resolved_mask_mode() == "compact"  # older configs
    assert TrainConfig(mask_mode="attention").resolved_mask_mode() == "attention"


def test_flags_map_onto_config() -> None:
    c = _parse(
        "--preset tiny-qwen2vl --data synthetic:3 --output /tmp/x --method sft --epochs 2 "
        "--batch-size 3 --grad-accum 2 --lr 1e-3 --projector-lr 1e-4 --warmup-ratio 0.1 "
        "--weight-decay 0.01 --max-grad-norm none --lora-r 8 --lora-alpha 16 --lora-dropout 0 "
        "--full-finetune --tau-text 0.2 --tau-image 0.5 --gf-reduce sum --grand-threshold 3 "
        "--mask-mode attention --attn eager --bf16 --max-train-samples 10 --eval-max-samples 5 "
        "--seed 7 --resume /tmp/r --stop-after-epochs 1".split()
    )
    assert c.model == "tiny-qwen2vl" and c.data == "synthetic:3" and c.output == "/tmp/x"
    assert (c.method, c.epochs, c.batch_size, c.grad_accum, c.effective_batch) == (
        "sft",
        2,
        3,
        2,
        6,
    )
    assert (c.lr, c.projector_lr, c.warmup_ratio, c.weight_decay) == (1e-3, 1e-4, 0.1, 0.01)
    assert c.max_grad_norm is None and (c.lora_r, c.lora_alpha, c.lora_dropout) == (8, 16, 0.0)
    assert c.full_finetune and c.bf16 and (c.tau_text, c.tau_image) == (0.2, 0.5)
    assert (c.gf_reduce, c.grand_threshold, c.mask_mode, c.attn) == (
        "sum",
        3.0,
        "attention",
        "eager",
    )
    assert (c.max_train_samples, c.eval_max_samples, c.seed) == (10, 5, 7)
    assert (c.resume, c.stop_after_epochs) == ("/tmp/r", 1)


def test_quick_fills_only_what_was_not_given() -> None:
    q = TrainConfig.quick_overrides()
    c = _parse(["--quick"])
    for k, v in q.items():
        assert getattr(c, k) == v
    c = _parse(["--quick", "--lr", "5e-4", "--epochs=1"])
    assert c.lr == 5e-4 and c.epochs == 1 and c.max_train_samples == q["max_train_samples"]


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("method", "dpo", "method"),
        ("mask_mode", "x", "mask_mode"),
        ("epochs", 0, "epochs"),
        ("batch_size", 0, "batch_size"),
        ("warmup_ratio", 1.5, "warmup_ratio"),
        ("lr", -1.0, "lr"),
        ("max_grad_norm", 0.0, "max_grad_norm"),
        ("gf_reduce", "max", "gf_reduce"),
        ("reweight", "rows", "reweight"),
        ("max_train_samples", 0, "max_train_samples"),
        ("tau_text", 5.0, r"tau_text must be a finite number in \[-1, 1\]"),
        ("tau_image", float("nan"), "tau_image"),
        ("lora_dropout", 1.0, r"lora_dropout must be a finite number in \[0, 1\)"),
        ("lr", 0.0, "lr"),
        ("lr", float("inf"), "lr"),
        ("projector_lr", float("nan"), "projector_lr"),
        ("max_grad_norm", float("inf"), "max_grad_norm"),
        ("on_bad_record", "ignore", "on_bad_record"),
        ("on_missing_image", "warn", "on_missing_image"),
    ],
)
def test_validation_names_the_field(field: str, value: object, msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        TrainConfig(**{field: value}).validate()


def test_cli_rejects_bad_values() -> None:
    with pytest.raises(SystemExit):
        _parse(["--method", "dpo"])
    assert _parse(["--max-grad-norm", "none"]).max_grad_norm is None
    with pytest.raises(UsageError, match="pass 'none' to disable clipping"):
        _parse(["--max-grad-norm", "0"])  # 0 no longer silently turns clipping off
    edge = TrainConfig(tau_text=-1.0, tau_image=1.0, lora_dropout=0.0).validate()
    assert (edge.tau_text, edge.tau_image) == (-1.0, 1.0)


def test_roundtrip(tmp_path) -> None:
    c = TrainConfig(lr=1e-3, grand_threshold=2.5)
    c.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == c
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"lr": 1.0, "bogus": 2})


def test_old_configs_with_retired_fields_still_load() -> None:
    """config.json files saved before ``log_every`` / ``extra`` were removed (resume reads them)."""
    old = {**TrainConfig(lr=1e-3).to_dict(), "log_every": 10, "extra": {}}
    assert TrainConfig.from_dict(old) == TrainConfig(lr=1e-3)


def test_cosine_schedule() -> None:
    """transformers' warm-up cosine: factor step / warmup, then cosine to 0 at the last step."""
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, 100, 10)
    factors = []
    for _ in range(101):
        factors.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    assert factors[0] == 0.0 and factors[5] == pytest.approx(0.5)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5)
    assert factors[100] == pytest.approx(0.0, abs=1e-12)
    assert factors[30] == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 90)))


def test_majority_baseline() -> None:
    recs = [
        SimpleNamespace(keyphrases=["cat", "animal"]),
        SimpleNamespace(keyphrases=["dog", "animal", "animal"]),
        SimpleNamespace(keyphrases=["cat"]),
    ]
    assert majority_keyphrases(recs, 2) == ["cat", "animal"]
