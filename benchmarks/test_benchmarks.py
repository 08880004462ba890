"""CPU-sized benchmark cases for pytest-benchmark: history and comparison between commits.

    pytest benchmarks/ --benchmark-only                       # run and print the table
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # keep a run in .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare   # compare with the last saved run

The step cases use the ``tiny-llava`` preset (LoRA r=16, B=4 samples at strides 2/2: 12 rows).
"""

from __future__ import annotations

import pytest
import torch

from aimkp.ops import masked_embedding
from benchmarks.bench_masked_embedding import make_batch
from benchmarks.workload import Workload, build_workload, run_aimkp, run_sft, run_token_floor


@pytest.fixture(scope="module")
def tiny() -> Workload:
    torch.set_num_threads(1)
    return build_workload("tiny", device="cpu", batch_size=4, lora_rank=16)


@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
def test_masked_embedding_fwd_bwd(benchmark, compact: bool) -> None:
    batch = make_batch(3, 256, 256, 1000, torch.float32, "cpu")
    weight = batch["weight"].requires_grad_(True)
    feats = batch["image_features"].requires_grad_(True)

    def run() -> None:
        out = masked_embedding(
            batch["input_ids"], weight, keep=batch["keep"], image_features=feats,
            image_token_id=batch["image_token_id"], compact=compact,
        )  # fmt: skip
        values = out.values if compact else out
        values.sum().backward()

    benchmark(run)
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_aimkp_step(benchmark, tiny: Workload) -> None:
    result = benchmark(run_aimkp, tiny)
    assert result.n_rows == len(tiny.rows)


def test_token_floor_step(benchmark, tiny: Workload) -> None:
    tokens = benchmark(run_token_floor, tiny)
    assert tokens == run_aimkp(tiny).n_input_tokens


def test_sft_step(benchmark, tiny: Workload) -> None:
    result = benchmark(run_sft, tiny)
    assert result.n_rows == len(tiny.samples)
