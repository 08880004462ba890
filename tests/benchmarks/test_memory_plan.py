"""The memory plan's counting (benchmarks/memory_plan.py) on tiny-llava: stash bytes per decoder
layer by storage kind, saved activations per layer, and the extrapolation arithmetic."""

from __future__ import annotations

import pytest
import torch

from aimkp.method.options import StepOptions
from aimkp.method.pmm import StrideTable
from aimkp.method.step import aimkp_step
from benchmarks import memory_plan as M
from tests.helpers.models import (
    records,
    tiny,
)


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(10, 4)
    view = a[2:5]
    ids = torch.zeros(3, dtype=torch.long)
    got = M.tensor_bytes({"x": [a, view], "y": (ids, None)})
    assert got == {"float": 160, "other": 24}


@pytest.mark.parametrize("storage", ["tokens", "rows"])
def test_stash_and_saved_counts_on_tiny_llava(storage):
    loaded = tiny("tiny-llava")
    samples = [loaded.adapter.encode(r) for r in records()[:2]]
    table = StrideTable(2)
    table.text[:] = 2
    table.image[:] = 2
    layer = loaded.adapter.language_model.layers[0]
    params = {p.untyped_storage().data_ptr() for p in loaded.model.parameters()}
    counts: list = []
    with M.saved_in_layer(layer, params) as saved:
        with M.engine_storage(storage, counts, saved["ptrs"]):
            res = aimkp_step(
                loaded, samples, [0, 1], table, 20.0, StepOptions(update_strides=False)
            )
    (c,) = counts
    assert saved["bytes"] > 0 and c is not None
    lora = [m for n, m in layer.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    if storage == "rows":  # per-row fp32 gradients of every LoRA factor of the layer
        want = sum(res.n_rows * m.weight.numel() * 4 for m in lora)
        assert c.layer_rows == want and c.layer_tokens == 0
    else:  # inputs + output gradients; the inputs are what autograd saved too
        assert c.layer_rows == 0 and c.layer_tokens > c.layer_shared > 0
    assert c.other > 0  # the projector


def test_extrapolate_arithmetic():
    mb = 2**20
    m = {
        "samples": 1,
        "peak": 1000 * mb,
        "saved": 400 * mb,
        "saved_scores": 0,
        "stash_tokens": 300 * mb,
        "stash_shared": 100 * mb,
        "stash_rows": 0,
        "stash_other": 50 * mb,
        "act_bytes": 4,
        "params": {"frozen_layer": 10, "frozen_other": 6, "train_layer": 2, "train_other": 1},
    }
    e = M.extrapolate(m, layers=32, batch=8)
    per_layer = (400 + 200) * mb / 2  # bf16 halves activations and the tokens stash
    rest = (1000 - 600 - 50) * mb / 2
    assert e["layers_gb"] == pytest.approx(per_layer * 32 * 8 / M.GB)
    assert e["other_gb"] == pytest.approx((50 * mb + rest) * 8 / M.GB)
    assert e["weights_gb"] == pytest.approx((10 * 32 + 6) * 2 / M.GB)
    assert e["trainable_state_gb"] == pytest.approx((2 * 32 + 1) * 16 / M.GB)
    assert M.largest_batch(m, e["total_gb"]) == 8
    # --reweight auto's pick: the stash (300 MiB tokens, bf16 halves: 150 per layer, + 50 other)
    # x 4 samples = 20.3 GB against 20% of what the (here tiny) weights and LoRA state leave:
    # over 16 GB, under 28.2 GB
    assert M.auto_choices(m, 4) == ["correction", "stash"]
    assert M.auto_choices(m, 8) == ["correction", "correction"]


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2vl"])
def test_param_split_counts_vision_block_zero_apart(preset):
    loaded = tiny(preset)
    block = M.first_block(loaded.adapter.vision_tower)
    n_blocks = len(next(m for m in loaded.adapter.vision_tower.modules()
                        if isinstance(m, torch.nn.ModuleList)))  # fmt: skip
    assert n_blocks == 2  # the presets' towers have two blocks; block 0 is counted apart
    layer = loaded.adapter.language_model.layers[0]
    split = M.param_split(loaded.model, layer, block)
    assert split["frozen_vision_layer"] == sum(p.numel() for p in block.parameters()) > 0
    assert sum(split.values()) == sum(p.numel() for p in loaded.model.parameters())


def test_extrapolate_counts_the_vision_layers_weights():
    m = {
        "samples": 1, "peak": 0, "saved": 0, "saved_scores": 0, "stash_tokens": 0,
        "stash_shared": 0, "stash_rows": 0, "stash_other": 0, "act_bytes": 4,
        "params": {"frozen_layer": 10, "frozen_other": 6, "train_layer": 2, "train_other": 1,
                   "frozen_vision_layer": 5},
        "layers_full": 28, "vision_layers_full": 32,
    }  # fmt: skip
    e = M.extrapolate(m, *M._at(m, 8))
    assert e["weights_gb"] == pytest.approx((10 * 28 + 5 * 32 + 6) * 2 / M.GB)


def test_profiled_peak_leaves_out_tensors_from_before():
    """The peak counts what the call allocates (here two 1 MB results at once), not the weight it
    reads (live before the call); parts say where the live bytes were allocated."""
    w = torch.randn(500, 500)

    def run() -> torch.Tensor:
        a = w @ w
        b = a + 1
        del a
        return b.sum()

    r = M.profiled_peak(run)
    assert 2_000_000 <= r["peak"] < 2_000_000 + 4096
    assert sum(r["parts"].values()) == r["peak"] and r["freed_earlier"] == 0


def test_profiled_peak_names_the_parts_of_a_step():
    """An AimKP step on tiny-llava: the bytes live at its peak are attributed to the parts of
    the program (decoder layers, the backward, the engine), none left unnamed."""
    loaded = tiny("tiny-llava")
    samples = [loaded.adapter.encode(r) for r in records()[:2]]
    table = StrideTable(2)
    table.text[:] = 2
    table.image[:] = 2
    r = M.profiled_peak(lambda: aimkp_step(loaded, samples, [0, 1], table, 20.0))
    assert sum(r["parts"].values()) == r["peak"] > 0
    assert {"decoder layers", "engine", "vision tower"} <= set(r["part_peaks"])
    assert r["parts"].get("decoder layers", 0) > 0 and "other" not in r["parts"]


def test_extrapolate_counts_the_engine_gradient_copy_once():
    """The engine's copy of the gradients it found is the trainable parameters' size at full
    depth (fp32), not scaled with the batch; the correction way keeps none."""
    mb = 2**20
    params = {"frozen_layer": 10, "frozen_other": 6, "train_layer": 2 * mb, "train_other": mb}
    m = {
        "samples": 1, "peak": 1000 * mb, "saved": 400 * mb, "stash_tokens": 0,
        "stash_rows": 0, "stash_other": 0, "act_bytes": 4, "params": params,
    }  # fmt: skip
    plain = M.extrapolate(m, layers=32, batch=8)
    copy = (2 * mb + mb) * 4  # measured at one layer
    with_copy = M.extrapolate({**m, "grad_copy": copy, "keeps_grad_copy": True}, 32, 8)
    full_copy = (2 * mb * 32 + mb) * 4
    want = plain["other_gb"] - copy / 2 * 8 / M.GB + full_copy / M.GB
    assert with_copy["other_gb"] == pytest.approx(want)
    without = M.extrapolate({**m, "grad_copy": copy, "keeps_grad_copy": False}, 32, 8)
    assert without["other_gb"] == pytest.approx(plain["other_gb"] - copy / 2 * 8 / M.GB)


def test_rows_from_results_round_trip(tmp_path):
    """``--from-results`` reads back what a run wrote: the measured fields and the split."""
    import json

    split = {"frozen_layer": 1, "frozen_other": 2, "train_layer": 3, "train_other": 4}
    row = {"storage": "auto", "samples": 1, "peak": 5, **split, "total_gb": 9.0}
    row["largest_batch_80gb"] = 3
    path = tmp_path / "plan.json"
    path.write_text(json.dumps([row, {**row, "storage": "correction"}]))
    (got,) = M.rows_from_results(str(path))
    assert got["params"] == split
    assert "total_gb" not in got and "largest_batch_80gb" not in got
    assert got["grad_copy"] == (3 + 4) * 4 and got["keeps_grad_copy"]
