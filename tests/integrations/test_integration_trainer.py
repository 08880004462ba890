"""AimKP inside ``transformers.Trainer`` (:class:`aimkp.integrations.transformers.AimKPTrainer`)
ends with the same weights and strides as ``aimkp train``'s own loop on the same data, seed and
global batches: one process with gradient accumulation, and 2 gloo ranks under ``torchrun``.

2 epochs (the second trains masked copies through Gradient-based Filtering), every weight of the
tiny language model trainable, no dropout, the same AdamW groups, warm-up cosine and clipping.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from tests.helpers.trainer_script import trainer_script

ROOT = pathlib.Path(__file__).resolve().parents[2]
CFG = dict(
    model="tiny-llava", data="default", max_train_samples=16, epochs=2, full_finetune=True,
    lr=2e-3, projector_lr=1e-3, warmup_ratio=0.3, eval_every_epoch=False, num_threads=1, seed=3,
    method="aimkp", batch_size=4, grad_accum=2, lora_dropout=0.0,
)  # fmt: skip

BODY = """
out, batch, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
args = training_args(
    out, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
    save_strategy="no",
)
trainer = AimKPTrainer(
    loaded, args, AimKPArguments(projector_lr=cfg.projector_lr), train_dataset=recs
)
trainer.train()
if trainer.is_world_process_zero():
    save_checkpoint(out + "/last", loaded)
    torch.save(trainer.strides.state_dict(), out + "/strides.pt")
    print("LOGS", [h for h in trainer.state.log_history if "loss" in h])
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd: list[str], cwd: pathlib.Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _weights(out: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "last" / "model.safetensors"))


@pytest.fixture(scope="module")
def own_loop(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from aimkp.train.config import TrainConfig
    from aimkp.train.loop import train

    out = tmp_path_factory.mktemp("own") / "run"
    threads = torch.get_num_threads()
    try:
        train(TrainConfig(**CFG, output=str(out)))
    finally:
        torch.set_num_threads(threads)
    return out


def _trainer(tmp: pathlib.Path, batch: int, accum: int, ranks: int) -> tuple[pathlib.Path, str]:
    script = tmp / "trainer_run.py"
    script.write_text(trainer_script(CFG, BODY))
    out = tmp / f"trainer{ranks}"
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    stdout = _run([*launch, str(script), str(out), str(batch), str(accum)], tmp)
    return out, stdout


def _assert_same_run(own: pathlib.Path, out: pathlib.Path, atol: float) -> None:
    w_own, w_tr = _weights(own), _weights(out)
    assert w_own.keys() == w_tr.keys()
    for k in w_own:
        torch.testing.assert_close(w_tr[k], w_own[k], atol=atol, rtol=0, msg=k)
    s_own = torch.load(own / "last" / "train_state.pt", weights_only=False)["strides"]
    s_tr = torch.load(out / "strides.pt", weights_only=True)
    assert torch.equal(s_own["text"], s_tr["text"]) and torch.equal(s_own["image"], s_tr["image"])
    assert bool((s_own["text"].abs() >= 2).all())  # the second epoch trained masked copies


def test_trainer_matches_own_loop(own_loop: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out, stdout = _trainer(tmp_path, batch=4, accum=2, ranks=1)
    _assert_same_run(own_loop, out, atol=1e-5)
    logs = stdout.split("LOGS", 1)[1]
    assert len(re.findall(r"'loss'", logs)) == 4  # 2 optimizer steps x 2 epochs
    assert "text_kept_rate" in logs and "grad_norm" in logs  # the second epoch's filter


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_trainer_two_ranks_match_own_loop(own_loop: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out, _ = _trainer(tmp_path, batch=2, accum=2, ranks=2)  # the same global batches of 8
    _assert_same_run(own_loop, out, atol=2e-5)


def _docs_trainer_example() -> str:
    """The example of the Trainer page of the docs (the README's is a shorter copy of it)."""
    text = (ROOT / "docs" / "trainer.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_docs_trainer_example_runs_and_resumes_strides(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ns: dict = {}
    exec(compile(_docs_trainer_example(), "docs/trainer.md", "exec"), ns)  # noqa: S102
    trainer = ns["trainer"]
    assert trainer.state.global_step == 2  # 8 posts, batch 4, one epoch
    assert 0 < trainer.state.log_history[-1]["train_loss"] < 100
    saved = tmp_path / "runs" / "trainer" / "checkpoint-2" / "aimkp_strides.pt"
    assert torch.equal(torch.load(saved, weights_only=True)["text"], trainer.strides.text)
    assert bool((trainer.strides.text == 2).all())  # every post's first visit doubles it
    from aimkp.integrations.transformers import AimKPTrainer

    again = AimKPTrainer(ns["loaded"], ns["args"], ns["aimkp_args"], train_dataset=ns["records"])
    assert bool((again.strides.text == 1).all())
    again.train(resume_from_checkpoint=True)  # the run is complete: nothing left to train
    assert torch.equal(again.strides.text, trainer.strides.text)
    assert torch.equal(again.strides.image, trainer.strides.image)


def test_mixin_with_trl_sft_trainer_matches_aimkp_trainer(tmp_path: pathlib.Path) -> None:
    """``AimKPTrainerMixin`` in front of TRL's ``SFTTrainer`` (skipped without trl) trains the
    same weights as ``AimKPTrainer``; TRL's own dataset preparation is skipped."""
    trl = pytest.importorskip("trl")
    from transformers import LlavaProcessor, TrainingArguments, set_seed

    from aimkp.data import load_dataset, to_hf
    from aimkp.integrations.transformers import AimKPArguments, AimKPTrainer, AimKPTrainerMixin
    from aimkp.models import load_model
    from aimkp.models.lora import apply_lora

    class AimKPSFTTrainer(AimKPTrainerMixin, trl.SFTTrainer):
        pass

    records = list(load_dataset("default", "train"))[:8]
    common = dict(per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-3,
                  report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                  disable_tqdm=True)  # fmt: skip

    def trained(make) -> dict[str, torch.Tensor]:
        set_seed(5)  # the LoRA factors' initial values too
        loaded = load_model("tiny-llava", train_texts=[r.text for r in records], seed=5)
        apply_lora(loaded, r=4, alpha=8, dropout=0.0, train_projector=True)
        trainer = make(loaded)
        trainer.train()
        return {
            n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad
        }

    plain = trained(
        lambda ld: AimKPTrainer(ld, TrainingArguments(output_dir=str(tmp_path / "a"), **common),
                                AimKPArguments(), train_dataset=to_hf(records))
    )  # fmt: skip
    sft_args = trl.SFTConfig(output_dir=str(tmp_path / "b"), gradient_checkpointing=False,
                             activation_checkpointing=False,
                             dataset_kwargs={"skip_prepare_dataset": True}, **common)  # fmt: skip
    sft = trained(
        lambda ld: AimKPSFTTrainer(
            ld, sft_args, AimKPArguments(), train_dataset=to_hf(records),
            processing_class=LlavaProcessor(image_processor=ld.image_processor,
                                            tokenizer=ld.tokenizer, patch_size=14),
        )
    )  # fmt: skip
    assert plain.keys() == sft.keys() and len(plain) > 4
    lora_b = [k for k in plain if "lora_B" in k]  # zero at the start: trained means moved
    assert lora_b and all(float(plain[k].abs().max()) > 0 for k in lora_b)
    for k in plain:
        torch.testing.assert_close(sft[k], plain[k], atol=1e-6, rtol=0, msg=k)
