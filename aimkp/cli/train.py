"""Fine-tune a multimodal LLM for keyphrase generation with AimKP (or plain SFT).

Examples:
  aimkp train --preset tiny-llava --data default --output runs/demo --quick
  aimkp train --model /models/llava-1.5-7b-hf --data /data/cmkp --output runs/cmkp --bf16
  aimkp train --preset tiny-llava --data default --output runs/demo --resume runs/demo
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from aimkp.cli._common import add_read_arguments, check_device, check_output_dir, removed_if_empty
from aimkp.cli.config_flags import (
    SHARED_READ_FIELDS,
    add_config_flags,
    given_fields,
    load_yaml_config,
)
from aimkp.train.config import TrainConfig

HELP = "train a model (AimKP: PMM + gradient-based filtering, or plain SFT)"

# flag groups of ``aimkp train -h`` (a field not listed here goes under "other")
GROUPS = {
    "model and data": (
        "model", "data", "valid_data", "output", "max_train_samples", "eval_max_samples",
        "eval_every_epoch", "baselines",
    ),
    "method": ("method", "tau_text", "tau_image", "gf_reduce", "grand_threshold", "reweight",
               "mask_mode", "attn"),
    "optimisation": (
        "epochs", "batch_size", "grad_accum", "lr", "projector_lr", "warmup_ratio",
        "weight_decay", "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout", "full_finetune",
        "freeze_embeddings", "bf16", "dtype", "gradient_checkpointing", "max_new_tokens",
        "device", "num_threads", "seed",
    ),
    "runs": ("resume", "stop_after_epochs", "logging_steps", "report_to"),
    "reliability": ("max_skipped_steps", "save_every", "keep_last", "allow_changed"),
}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`aimkp.train.TrainConfig` field (generated, :mod:`.config_flags`),
    the shared reading flags, ``--config`` and ``--quick``."""
    add_read_arguments(p.add_argument_group("reading data"))
    for action in p._actions:  # absent unless given, like the generated flags
        if action.dest in SHARED_READ_FIELDS:
            action.default = argparse.SUPPRESS
    add_config_flags(p, TrainConfig, GROUPS)
    g = p.add_argument_group("configuration")
    g.add_argument(
        "--config",
        metavar="YAML",
        default=None,
        help="options from a YAML file (keys: the long flags with '_', e.g. grad_accum: 2); "
        "flags given on the command line win",
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="demo-sized settings for what neither a flag nor --config sets",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: defaults < ``--quick`` < ``--config`` file < flags given (the
    namespace holds only the flags that were given)."""
    fields: dict[str, Any] = TrainConfig.quick_overrides() if args.quick else {}
    fields.update(_set_by_user(args))
    return TrainConfig(**fields).validate()


def _set_by_user(args: argparse.Namespace) -> dict[str, Any]:
    """The fields the ``--config`` file and the given flags set (flags win)."""
    from_file = {} if args.config is None else load_yaml_config(args.config, TrainConfig)
    return {**from_file, **given_fields(args, TrainConfig)}


def resumed_config(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """``--resume DIR``: the saved run's options for every field not given (``given``: the
    fields set by a flag or ``--config``), the output defaulting to the resumed run directory."""
    import json
    import pathlib

    from aimkp.runs.state import find_train_state, read_train_state
    from aimkp.train.resume_check import resumed_fields

    resume = str(cfg.resume)  # set: this runs for --resume only
    state_file = find_train_state(resume)
    run_dir = state_file.parent.parent if state_file.parent.name == "last" else state_file.parent
    saved_json = pathlib.Path(run_dir) / "config.json"
    try:
        saved = json.loads(saved_json.read_text())
    except (OSError, ValueError):  # no (readable) config.json: the one in the training state
        saved = read_train_state(resume)["config"]
    fields = resumed_fields(cfg.to_dict(), given, saved, str(run_dir))
    return TrainConfig(**fields).validate()


def _check_device_options(cfg: TrainConfig) -> None:
    """Options that depend on the device (``--dtype`` half needs CUDA), before anything loads."""
    import torch

    from aimkp.models.attention import resolve_attention
    from aimkp.models.precision import resolve_dtype

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolve_dtype(cfg.dtype, device)
    resolve_attention(cfg.attn, device)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    cfg = config_from_args(args)
    if cfg.resume is not None:  # the saved run's options fill in what the user did not set
        cfg = resumed_config(cfg, set(_set_by_user(args)))
    _check_before_training(cfg)
    import torch.distributed as dist

    from aimkp.train.loop import train

    try:
        with removed_if_empty(cfg.output):  # a run that fails before writing leaves no directory
            summary = train(cfg)
    finally:
        if dist.is_available() and dist.is_initialized():  # under torchrun
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(
            f"[aimkp train] done: {summary['steps']} steps, best valid score "
            f"{summary['best_score']} at epoch {summary['best_epoch']}; "
            f"checkpoints in {summary['output']}/best and /last"
        )
        print(
            f"[aimkp train] non-finite: {summary['nonfinite_rows']} rows excluded, "
            f"{summary['nonfinite_skipped_steps']} steps skipped"
        )
    return 0


def _check_before_training(cfg: TrainConfig) -> None:
    """The checks that need no data and no model: paths, device, model spec."""
    from aimkp.models import check_model_spec

    check_output_dir(cfg.output, "--output")
    check_device(cfg.device)
    _check_device_options(cfg)
    from aimkp.train.reporting import check_report_to

    check_report_to(cfg.report_to)
    check_model_spec(cfg.model)
    if cfg.resume is not None:
        from aimkp.runs.state import find_train_state

        find_train_state(cfg.resume)
