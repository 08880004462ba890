"""Fine-tune a multimodal LLM for keyphrase generation with AimKP (or plain SFT).

Examples:
  aimkp train --preset tiny-llava --data default --output runs/demo --quick
  aimkp train --model /models/llava-1.5-7b-hf --data /data/cmkp --output runs/cmkp --bf16
  aimkp train --preset tiny-llava --data default --output runs/demo --resume runs/demo
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from aimkp.cli._common import add_read_arguments, check_device, check_output_dir, removed_if_empty
from aimkp.train.config import ATTN, DTYPES, GF_REDUCE, MASK_MODES, METHODS, TrainConfig

HELP = "train a model (AimKP: PMM + gradient-based filtering, or plain SFT)"

_D = TrainConfig()


def _opt_float(s: str) -> float | None:
    """``none`` / ``off`` -> None; anything else a float (0 is refused by validation, so a typo
    cannot silently turn clipping off)."""
    return None if s.lower() in ("none", "off") else float(s)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags map one-to-one onto :class:`aimkp.train.TrainConfig` fields."""
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        "--preset",
        dest="model",
        default=_D.model,
        help="preset name (tiny-llava, tiny-qwen2vl, tiny-qwen25vl, tiny-idefics3), a local "
        "checkpoint directory (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3 / SmolVLM) or a hub id "
        "(org/name) in the local Hugging Face cache",
    )
    g.add_argument(
        "--data", default=_D.data, help="dataset spec (default, synthetic:SEED, path, hf:DIR)"
    )
    g.add_argument(
        "--valid-data",
        default=None,
        metavar="SPEC",
        help="validation data (file or spec; its 'valid' split); required when --data is one file",
    )
    add_read_arguments(g)
    g.add_argument("--output", default=_D.output, help="run directory")
    g.add_argument("--max-train-samples", type=int, default=None)
    g.add_argument("--eval-max-samples", type=int, default=None)
    g.add_argument("--no-eval", action="store_true", help="skip the per-epoch validation")
    g.add_argument(
        "--baselines",
        action="store_true",
        help="also score an untrained model and a majority baseline on test",
    )
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default=_D.method)
    g.add_argument("--tau-text", type=float, default=_D.tau_text)
    g.add_argument("--tau-image", type=float, default=_D.tau_image)
    g.add_argument(
        "--gf-reduce",
        choices=GF_REDUCE,
        default=_D.gf_reduce,
        help="mean of kept copies (reference code) or the paper's sum",
    )
    g.add_argument(
        "--grand-threshold",
        type=float,
        default=None,
        help="prune originals whose gradient-norm robust z-score exceeds this",
    )
    g.add_argument(
        "--mask-mode",
        choices=MASK_MODES,
        default=_D.mask_mode,
        help="compact (default): hidden tokens dropped, kept ones keep their positions; rows "
        "packed (varlen) with --attn varlen / flash, padded to the longest kept row otherwise; "
        "attention: the reference formulation (full rows, hidden tokens masked); auto: same as "
        "compact",
    )
    g.add_argument(
        "--attn",
        choices=ATTN,
        default=_D.attn,
        help="auto (default): varlen on CUDA where torch has its varlen FlashAttention kernel, "
        "sdpa otherwise; varlen: compact rows packed into one sequence (cu_seqlens) through "
        "torch.nn.attention.varlen (CUDA, bf16/fp16) or a per-row reference (CPU); flash: "
        "flash-attn's varlen kernel (needs flash-attn); sdpa / eager: rows padded",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=_D.epochs)
    g.add_argument("--batch-size", type=int, default=_D.batch_size, help="micro-batch size")
    g.add_argument("--grad-accum", type=int, default=_D.grad_accum)
    g.add_argument("--lr", type=float, default=_D.lr)
    g.add_argument("--projector-lr", type=float, default=_D.projector_lr)
    g.add_argument("--warmup-ratio", type=float, default=_D.warmup_ratio)
    g.add_argument("--weight-decay", type=float, default=_D.weight_decay)
    g.add_argument(
        "--max-grad-norm",
        type=_opt_float,
        default=_D.max_grad_norm,
        help="clip norm ('none' to disable)",
    )
    g.add_argument("--lora-r", type=int, default=_D.lora_r)
    g.add_argument("--lora-alpha", type=int, default=_D.lora_alpha)
    g.add_argument("--lora-dropout", type=float, default=_D.lora_dropout)
    g.add_argument(
        "--full-finetune",
        action="store_true",
        help="train every language-model weight (input embedding included) and the projector",
    )
    g.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="with --full-finetune: keep the input embedding table frozen",
    )
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=_D.dtype,
        help="dtype of the FROZEN base weights (auto: bfloat16 on CUDA, float32 on CPU); "
        "trainable LoRA / projector weights and the optimizer state stay float32, computing "
        "under autocast",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute decoder activations in the backward (non-reentrant) to save memory",
    )
    g.add_argument("--max-new-tokens", type=int, default=_D.max_new_tokens)
    g.add_argument("--device", default=None)
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is fastest for tiny models on a few shared cores)",
    )
    g.add_argument("--seed", type=int, default=_D.seed)
    g = p.add_argument_group("runs")
    g.add_argument("--resume", default=None, metavar="DIR", help="run directory to continue")
    g.add_argument(
        "--stop-after-epochs",
        type=int,
        default=None,
        help="stop (resumably) after this many epochs",
    )
    g.add_argument(
        "--quick", action="store_true", help="demo-sized settings; explicitly given flags still win"
    )
    add_reliability_arguments(p)


# --- reliability (issue 11): non-finite steps, mid-epoch checkpoints, resume checks -----------
def _help(name: str) -> str:
    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name).metadata["help"]


def _names(s: str) -> list[str]:
    return [n.strip().replace("-", "_") for n in s.split(",") if n.strip()]


def add_reliability_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the reliability fields of :class:`TrainConfig` (help from their metadata)."""
    g = p.add_argument_group("reliability")
    g.add_argument(
        "--max-skipped-steps",
        type=int,
        default=_D.max_skipped_steps,
        metavar="K",
        help=_help("max_skipped_steps"),
    )
    g.add_argument("--save-every", type=int, default=None, metavar="N", help=_help("save_every"))
    g.add_argument("--keep-last", type=int, default=None, metavar="K", help=_help("keep_last"))
    g.add_argument(
        "--allow-changed",
        type=_names,
        default=[],
        metavar="NAMES",
        help=_help("allow_changed") + " (comma-separated, e.g. lr,epochs)",
    )


def reliability_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The reliability fields of :class:`TrainConfig` from the parsed flags."""
    return {
        "max_skipped_steps": args.max_skipped_steps,
        "save_every": args.save_every,
        "keep_last": args.keep_last,
        "allow_changed": args.allow_changed,
    }


def resumed_config(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """``--resume DIR``: the saved run's options for every flag not given (``given``: the
    field names whose flags were), the output defaulting to the resumed run directory."""
    import json
    import pathlib

    from aimkp.train.resume_check import resumed_fields
    from aimkp.train.state import find_train_state, read_train_state

    state_file = find_train_state(cfg.resume)
    run_dir = state_file.parent.parent if state_file.parent.name == "last" else state_file.parent
    saved_json = pathlib.Path(run_dir) / "config.json"
    try:
        saved = json.loads(saved_json.read_text())
    except (OSError, ValueError):  # no (readable) config.json: the one in the training state
        saved = read_train_state(cfg.resume)["config"]
    fields = resumed_fields(cfg.to_dict(), given, saved, str(run_dir))
    return TrainConfig(**fields).validate()


# ----------------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace, argv_flags: set[str] | None = None) -> TrainConfig:
    """Build the TrainConfig; with ``--quick`` the demo settings apply to flags not given."""
    fields: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "valid_data": args.valid_data,
        "image_dir": args.image_dir,
        "on_missing_image": args.on_missing_image,
        "on_bad_record": args.on_bad_record,
        "output": args.output,
        "method": args.method,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "projector_lr": args.projector_lr,
        "warmup_ratio": args.warmup_ratio,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "full_finetune": args.full_finetune,
        "freeze_embeddings": args.freeze_embeddings,
        "tau_text": args.tau_text,
        "tau_image": args.tau_image,
        "gf_reduce": args.gf_reduce,
        "grand_threshold": args.grand_threshold,
        "mask_mode": args.mask_mode,
        "attn": args.attn,
        "bf16": args.bf16,
        "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "max_train_samples": args.max_train_samples,
        "eval_max_samples": args.eval_max_samples,
        "eval_every_epoch": not args.no_eval,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "resume": args.resume,
        "stop_after_epochs": args.stop_after_epochs,
        "baselines": args.baselines,
        "device": args.device,
        "num_threads": args.threads,
        **reliability_fields(args),
    }
    if args.quick:
        given = argv_flags or set()
        for k, v in TrainConfig.quick_overrides().items():
            if k not in given:
                fields[k] = v
    return TrainConfig(**fields).validate()


def _given_flags(argv: list[str] | None) -> set[str]:
    """Config field names whose flag appears on the command line (``--lr 1e-3`` -> ``lr``)."""

    argv = sys.argv[1:] if argv is None else argv
    out = set()
    for a in argv:
        if a.startswith("--"):
            name = a[2:].split("=", 1)[0].replace("-", "_")
            out.add(
                {"preset": "model", "threads": "num_threads", "no_eval": "eval_every_epoch"}.get(
                    name, name
                )
            )
    return out


def _check_device_options(cfg: TrainConfig) -> None:
    """Options that depend on the device (``--dtype`` half needs CUDA), before anything loads."""
    import torch

    from aimkp.models.attention import resolve_attention
    from aimkp.models.precision import resolve_dtype

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolve_dtype(cfg.dtype, device)
    resolve_attention(cfg.attn, device)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    given = _given_flags(argv if argv is not None else getattr(args, "argv", None))
    cfg = config_from_args(args, given)
    if cfg.resume is not None:
        cfg = resumed_config(cfg, given)
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
    check_model_spec(cfg.model)
    if cfg.resume is not None:
        from aimkp.train.state import find_train_state

        find_train_state(cfg.resume)
