"""The script the Trainer tests run in processes of their own (one process, or torchrun's
ranks): ``aimkp train``'s set-up of ``CFG`` (seed, records, the trainable model) and
``training_args`` with ``aimkp train``'s schedule and optimizer settings, then the test's own
Trainer run (``body``, which reads ``sys.argv``)."""

from __future__ import annotations

import textwrap
from typing import Any

SETUP = """
import sys, torch
from transformers import TrainingArguments, set_seed
from aimkp.integrations.transformers import AimKPArguments, AimKPTrainer
from aimkp.models import save_checkpoint
from aimkp.train.config import TrainConfig
from aimkp.train.data import load_split
from aimkp.train.run import _load_trainable_model

cfg = TrainConfig(**CFG)
torch.set_num_threads(1)
set_seed(cfg.seed)
recs = load_split(cfg, "train")[: cfg.max_train_samples]
loaded = _load_trainable_model(cfg, recs, torch.device("cpu"))


def training_args(out, **extra):
    return TrainingArguments(
        output_dir=out, num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio, weight_decay=0.0,
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, use_cpu=True, report_to="none",
        logging_steps=1, disable_tqdm=True, **extra,
    )
"""


def trainer_script(cfg: dict[str, Any], body: str) -> str:
    """The script's text: ``CFG``, the set-up, then ``body``."""
    return f"CFG = {cfg!r}\n" + SETUP + textwrap.dedent(body)
