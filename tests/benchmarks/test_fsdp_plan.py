"""The per-rank FSDP2 plan's arithmetic (benchmarks/fsdp_plan.py) on the committed memory plan."""

from __future__ import annotations

import pytest

from benchmarks import fsdp_plan as F


@pytest.mark.parametrize("shape", list(F.SHAPES))
def test_one_rank_lora_is_the_memory_plan(shape: str) -> None:
    """One GPU, LoRA, B = 8: the memory plan's own total of its correction row."""
    rows = F.load_plan(shape)
    p = F.params_of(rows, shape)
    r = F.rank_plan(p, "lora", 1, F.activations_gb(rows, 8, ckpt=False))
    want = next(x for x in rows if x["storage"] == "correction")["total_gb"]
    assert r["total_gb"] == pytest.approx(want, rel=1e-9)
    assert r["gathered_gb"] == r["accum_gb"] == 0


def test_sharding_divides_the_state_and_counts_full_finetuning() -> None:
    p = F.Params(layers=2, vision_layers=1, frozen_layer=100, train_layer=10, frozen_other=70,
                 train_other=5, frozen_vision_layer=20, vocab=4, hidden=8)  # fmt: skip
    # LoRA: frozen 2*100 + 20 + 70 = 290 (bf16), trainable 2*10 + 5 = 25 (16 bytes each)
    assert p.split("lora") == (290, 25, 75, 110)
    one = F.rank_plan(p, "lora", 1, 0.0)
    assert one["sharded_gb"] * F.GB == pytest.approx(290 * 2 + 25 * 16)
    four = F.rank_plan(p, "lora", 4, 1.5)
    assert four["sharded_gb"] == pytest.approx(one["sharded_gb"] / 4)
    # root (70 + 5) and two layers (110 each) in bf16, one layer's LoRA gradients in fp32
    assert four["gathered_gb"] * F.GB == pytest.approx((75 + 220) * 2 + 10 * 4)
    assert four["total_gb"] == pytest.approx(four["sharded_gb"] + four["gathered_gb"] + 1.5)
    assert four["accum_gb"] * F.GB == pytest.approx(25 * 4)
    # full: the decoder layers, embedding + head (2 * 4 * 8) and projector train; the vision
    # layer and the stem (70 - 64 - 5 = 1) stay frozen
    assert p.split("full") == (21, 2 * 100 + 64 + 5, 64 + 5 + 1, 100)
    with pytest.raises(ValueError):
        p.split("qlora")


def test_largest_batch_is_the_last_that_fits() -> None:
    rows = F.load_plan("llava7b")
    p = F.params_of(rows, "llava7b")
    for mode in F.MODES:
        for world in F.WORLDS:
            b = F.largest_batch(p, rows, mode, world, 80.0, ckpt=True)
            fits = F.rank_plan(p, mode, world, F.activations_gb(rows, b, True))["total_gb"]
            over = F.rank_plan(p, mode, world, F.activations_gb(rows, b + 1, True))["total_gb"]
            assert (b == 0 or fits <= 80.0) and over > 80.0


def test_table_lists_every_configuration() -> None:
    text = F.table(8, 80.0, ckpt=False)
    assert len(text.splitlines()) == 2 + len(F.SHAPES) * len(F.MODES) * len(F.WORLDS)
    assert "| llava7b | lora | 8 |" in text
