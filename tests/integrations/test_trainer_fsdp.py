"""``AimKPTrainer`` under accelerate's FSDP2 plugin (``fsdp=True, fsdp_config={"version": 2}``),
2 gloo ranks under ``torchrun`` on the CPU.

Against ``torchrun -m aimkp train ... --fsdp`` on the same data, seed and global batches (full
fine-tuning and LoRA, AimKP for 2 epochs with thresholds that make the filter reject copies, so the
correction pass and the lockstep's zero-weight passes run): the same stride tables and the same
weights to atol 1e-6. Both run the same FSDP2 units (:func:`aimkp.train.fsdp.shard_for_rows`)
and the same passes in the same order on each rank; what differs is clipping: Trainer clips with
``clip_grad_norm_`` (a norm of per-parameter fp32 norms over DTensors), aimkp's loop with the
fp64 sum of the shards' squares, so the clip factors differ in the last bits (measured: max
weight difference 3.7e-9 after 8 AdamW steps; 0.0 with clipping off; the LoRA adapters came out
bit-identical).

Then Trainer's own FSDP2 checkpoints: resumed from the checkpoint inside the first epoch and from
the one at its end, the run ends with the same weights (to the bit) and strides as without the
interruption.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from aimkp.errors import UsageError
from aimkp.integrations.transformers import (
    AimKPArguments,
    AimKPBatchSampler,
    enable_fsdp_plugin,
    shard_trainer_model,
)
from tests.helpers.trainer_script import trainer_script

ROOT = pathlib.Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CFG = dict(
    model="tiny-llava", data="default", max_train_samples=16, epochs=2, full_finetune=True,
    lr=2e-3, projector_lr=1e-3, warmup_ratio=0.3, eval_every_epoch=False, num_threads=1, seed=3,
    method="aimkp", batch_size=2, grad_accum=2, lora_dropout=0.0, tau_text=0.9999, tau_image=0.99,
)  # fmt: skip
CLI = [
    "-m", "aimkp", "train", "--preset", "tiny-llava", "--data", "default",
    "--max-train-samples", "16", "--epochs", "2", "--full-finetune", "--lr", "2e-3",
    "--projector-lr", "1e-3", "--warmup-ratio", "0.3", "--no-eval", "--threads", "1",
    "--seed", "3", "--method", "aimkp", "--batch-size", "2", "--grad-accum", "2",
    "--lora-dropout", "0", "--tau-text", "0.9999", "--tau-image", "0.99", "--fsdp",
]  # fmt: skip

BODY = """
out, resume = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
args = training_args(
    out, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
    save_strategy="steps", save_steps=1, fsdp=True, fsdp_config={"version": 2},
)
aimkp_args = AimKPArguments(
    tau_text=cfg.tau_text, tau_image=cfg.tau_image, projector_lr=cfg.projector_lr
)
trainer = AimKPTrainer(loaded, args, aimkp_args, train_dataset=recs)
assert trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2
trainer.train(resume_from_checkpoint=resume)
trainer.save_model(out + "/final")  # gathered on rank 0, the HF format
if trainer.is_world_process_zero():
    torch.save(trainer.strides.state_dict(), out + "/strides.pt")
"""

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(cmd: list[str], cwd: pathlib.Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _trainer(
    tmp: pathlib.Path, out: pathlib.Path, resume: pathlib.Path | None = None, lora: bool = False
) -> None:
    script = tmp / "trainer_fsdp.py"
    cfg = {k: v for k, v in CFG.items() if not (lora and k == "full_finetune")}
    script.write_text(trainer_script(cfg, BODY))
    _run([*TORCHRUN, str(script), str(out), *([str(resume)] if resume else [])], tmp)


def _weights(model_dir: pathlib.Path) -> dict[str, torch.Tensor]:
    """The parameters of a saved model directory, by the model's own names (aimkp's checkpoint
    and Trainer's ``save_model`` write the same weights under different key layouts)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _strides(path: pathlib.Path) -> dict[str, torch.Tensor]:
    st = torch.load(path, weights_only=False)
    return st["strides"] if "strides" in st else st


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    tmp = tmp_path_factory.mktemp("trainer_fsdp")
    _trainer(tmp, tmp / "run")
    return tmp / "run"


def test_trainer_fsdp2_matches_aimkp_train_fsdp(trainer_run: pathlib.Path, tmp_path) -> None:
    out = tmp_path / "cli"
    _run([*TORCHRUN, *CLI, "--output", str(out)], tmp_path)
    _assert_same(_weights(trainer_run / "final"), _weights(out / "last"), atol=1e-6)
    mine, cli = _strides(trainer_run / "strides.pt"), _strides(out / "last" / "rank-0.pt")
    for kind in ("text", "image"):
        assert torch.equal(mine[kind], cli[kind]), kind
    assert bool((mine["text"].abs() >= 2).all())  # the second epoch trained masked copies


def test_trainer_fsdp2_lora_matches_aimkp_train_fsdp(tmp_path: pathlib.Path) -> None:
    from safetensors.torch import load_file

    _trainer(tmp_path, tmp_path / "trainer", lora=True)
    lora_cli = [a for a in CLI if a != "--full-finetune"]
    _run([*TORCHRUN, *lora_cli, "--output", str(tmp_path / "cli")], tmp_path)
    name = "adapter_model.safetensors"  # peft's format, from both
    mine = load_file(tmp_path / "trainer" / "final" / name)
    _assert_same(mine, load_file(tmp_path / "cli" / "last" / name), atol=1e-6)
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in mine.items())  # trained


@pytest.mark.parametrize("step", [1, 2], ids=["inside-epoch", "epoch-end"])
def test_trainer_fsdp2_resumes_exactly(trainer_run: pathlib.Path, tmp_path, step: int) -> None:
    """Trainer's FSDP2 checkpoint (sharded optimizer, full model) and each rank's strides."""
    ckpt = tmp_path / "run" / f"checkpoint-{step}"
    shutil.copytree(trainer_run / f"checkpoint-{step}", ckpt)
    assert (ckpt / "aimkp_strides-rank-1.pt").is_file()
    _trainer(tmp_path, tmp_path / "run", resume=ckpt)
    _assert_same(_weights(tmp_path / "run" / "final"), _weights(trainer_run / "final"))
    again, once = _strides(tmp_path / "run" / "strides.pt"), _strides(trainer_run / "strides.pt")
    assert all(torch.equal(again[k], once[k]) for k in ("text", "image"))


def test_lockstep_sampler_gives_every_rank_rank0s_micro_batches() -> None:
    """10 samples, global batches of 2 x 2 x 2 = 8: the last global batch has 2 samples, one
    per rank; 9 samples: rank 1 gets an empty micro-batch where rank 0 has one sample."""
    for n in (10, 9):
        shares = [AimKPBatchSampler(n, 2, 2, seed=0, rank=r, world=2, lockstep=True)
                  for r in (0, 1)]  # fmt: skip
        mbs = [list(s) for s in shares]
        assert len(mbs[0]) == len(mbs[1]) == 3
        assert sorted(i for m in mbs for b in m for i in b) == list(range(n))
    assert list(shares[1])[-1] == [] and len(list(shares[0])[-1]) == 1


def test_trainer_fsdp_refusals() -> None:
    """FSDP1, the stash reweight, LoRA dropout (the correction pass would not be exact), and
    FSDP without a process group: one line each."""
    v1 = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=1))))  # fmt: skip
    with pytest.raises(UsageError, match="FSDP2 only"):
        shard_trainer_model(v1)
    with pytest.raises(UsageError, match="reweight='correction'"):
        AimKPArguments(reweight="stash").step_options("cpu", False, fsdp=True)
    assert AimKPArguments().step_options("cpu", False, fsdp=True).reweight == "correction"
    lora = torch.nn.Module()
    lora.q_proj = torch.nn.Module()
    lora.q_proj.lora_dropout = torch.nn.ModuleDict({"default": torch.nn.Dropout(0.05)})
    dropped = SimpleNamespace(
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
            fsdp_version=2))), loaded=SimpleNamespace(model=lora), args=SimpleNamespace(
            device="cpu"),
    )  # fmt: skip
    with pytest.raises(UsageError, match="LoRA dropout 0.05"):
        shard_trainer_model(dropped)
    if not torch.distributed.is_initialized():
        with pytest.raises(UsageError, match="launch with torchrun"):
            enable_fsdp_plugin(SimpleNamespace())
