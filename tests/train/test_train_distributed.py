"""Data-parallel AimKP training: ``torchrun --nproc_per_node 2 -m aimkp train`` (gloo on CPU) ends
with the same weights and stride tables as one process training on the same global batches.

2 epochs so that the second one trains masked copies through Gradient-based Filtering (strides 2),
with every weight trainable (input embedding included) and no dropout, so the runs are comparable
up to float summation order.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from aimkp.train.distributed import DistContext, all_reduce_grads, rank_share

COMMON = [
    "train", "--preset", "tiny-llava", "--data", "default", "--max-train-samples", "8",
    "--epochs", "2", "--full-finetune", "--lr", "2e-3", "--no-eval", "--threads", "1",
    "--seed", "3", "--method", "aimkp",
]  # fmt: skip


def _run(cmd: list[str], tmp: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _weights(run: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "last" / "model.safetensors"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_match_one_process(tmp_path: pathlib.Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "aimkp", *COMMON, "--batch-size", "4", "--output", str(one)],
         tmp_path)  # fmt: skip
    res = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "aimkp", *COMMON, "--batch-size", "2", "--output", str(two)],
        tmp_path,
    )  # fmt: skip
    assert res.stdout.count("[aimkp train] done") == 1  # rank 0 reports, rank 1 does not
    assert "rank 1 of 2 (gloo)" in res.stderr
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4, msg=k)
    base = _weights_untrained(tmp_path)
    assert base.keys() == w1.keys()
    trained = [k for k in w1 if not k.startswith("vision_tower.")]  # the tower stays frozen
    assert len(trained) > 20
    for k in trained:  # every trained tensor moved, so equal results are not equal non-updates
        assert not torch.equal(w1[k], base[k]), k
    s1 = torch.load(one / "last" / "train_state.pt", weights_only=False)["strides"]
    s2 = torch.load(two / "last" / "train_state.pt", weights_only=False)["strides"]
    assert torch.equal(s1["text"], s2["text"]) and torch.equal(s1["image"], s2["image"])
    assert bool((s1["text"].abs() >= 2).all())  # the second epoch trained masked copies
    m1 = (one / "metrics.csv").read_text().splitlines()
    m2 = (two / "metrics.csv").read_text().splitlines()
    assert len(m1) == len(m2) == 3
    col = m1[0].split(",").index("text_copies")
    assert m1[2].split(",")[col] == m2[2].split(",")[col] == "8"  # totals over both ranks


def _weights_untrained(tmp: pathlib.Path) -> dict[str, torch.Tensor]:
    """The preset's initial weights (same seed and tokenizer texts as the runs), saved the way
    the runs save theirs."""
    from aimkp.data import load_dataset
    from aimkp.models import load_model, save_checkpoint

    recs = list(load_dataset("default", "train"))[:8]
    texts = [r.text for r in recs] + [", ".join(r.keyphrases) for r in recs]
    save_checkpoint(tmp / "init" / "last", load_model("tiny-llava", train_texts=texts, seed=3))
    return _weights(tmp / "init")


def test_rank_share_and_single_process_reduce() -> None:
    ctx = DistContext(rank=1, world_size=3)
    assert rank_share([10, 11, 12, 13, 14, 15, 16], ctx) == [11, 14]
    assert rank_share([10, 11], DistContext(rank=2, world_size=3)) == []
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    all_reduce_grads([p], DistContext())  # one process: nothing to do
    assert torch.equal(p.grad, torch.full((3,), 2.0))
