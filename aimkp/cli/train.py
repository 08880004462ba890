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
import pathlib
from typing import Any

from aimkp.atomic import no_space_is_usage_error
from aimkp.cli._common import add_read_arguments, check_device, check_output_dir, removed_if_empty
from aimkp.cli.config_flags import (
    SHARED_READ_FIELDS,
    add_config_flags,
    given_fields,
    load_yaml_config,
)
from aimkp.runs.outdir import check_run_output
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

    from aimkp.runs.resume_check import resumed_fields
    from aimkp.runs.state import find_train_state, read_train_state

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


def _check_device_options(cfg: TrainConfig, given: set[str] | None = None) -> None:
    """Options that depend on the device (``--dtype`` half and ``--bf16`` need CUDA) and
    options that contradict each other, before anything loads; options that would do nothing
    are logged once as a warning."""
    import torch

    from aimkp.models.attention import resolve_attention
    from aimkp.models.precision import resolve_dtype

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolve_dtype(cfg.dtype, device)
    resolve_attention(cfg.attn, device)
    for warning in cfg.check_consistency(torch.device(device).type, given):
        logging.getLogger("aimkp.train").warning("%s", warning)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    cfg = config_from_args(args)
    if cfg.resume is not None:  # the saved run's options fill in what the user did not set
        cfg = resumed_config(cfg, set(_set_by_user(args)))
    _check_before_training(cfg, set(_set_by_user(args)))
    import torch.distributed as dist

    from aimkp.train.loop import train

    try:
        # a run that fails before writing leaves no directory; a full disk is named in one line
        with removed_if_empty(cfg.output), no_space_is_usage_error(cfg.output):
            summary = train(cfg)
    finally:
        if dist.is_available() and dist.is_initialized():  # under torchrun
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"[aimkp train] done: {summary['steps']} steps, {_best_and_last(summary)}")
        print(
            f"[aimkp train] non-finite: {summary['nonfinite_rows']} rows excluded, "
            f"{summary['nonfinite_skipped_steps']} steps skipped"
        )
    return 0


def _check_before_training(cfg: TrainConfig, given: set[str] | None = None) -> None:
    """The checks that need no data and no model: paths, device, options, model spec
    (``given``: the options the user set, for the options-consistency check)."""
    from aimkp.models import check_model_spec

    check_output_dir(cfg.output, "--output")
    check_run_output(cfg.output, cfg.resume)  # nothing of the user's is overwritten
    check_device(cfg.device)
    _check_device_options(cfg, given)
    from aimkp.runs.reporting import check_report_to

    check_report_to(cfg.report_to)
    check_model_spec(cfg.model)
    check_post_lengths(cfg)
    if cfg.resume is not None:
        from aimkp.models.checkpoint import validate_checkpoint
        from aimkp.runs.state import find_train_state

        validate_checkpoint(find_train_state(cfg.resume).parent)


def check_post_lengths(cfg: TrainConfig) -> None:
    """A post longer than the model's context, named (file:line) before the model loads: the
    text and keyphrases of every training and validation post tokenized with the model
    directory's own tokenizer (a lower bound: the prompt template and the image tokens come on
    top; a post that only overflows with them is named, file:line too, when it is encoded).
    Local model directories only: a preset builds in seconds, so its own check comes as soon."""
    # imported here, as in every subcommand: parsing ``aimkp train -h`` loads no transformers
    from transformers import AutoConfig, AutoTokenizer

    from aimkp.data import load_dataset
    from aimkp.data.options import reader_options
    from aimkp.errors import DataError
    from aimkp.train.data import split_spec

    model = pathlib.Path(cfg.model).expanduser()
    if not (model / "config.json").is_file() or not (model / "tokenizer_config.json").is_file():
        return
    config = AutoConfig.from_pretrained(model, local_files_only=True)
    text_config = getattr(config, "text_config", None) or config
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit is None:
        return
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    for split, cap in (("train", cfg.max_train_samples), ("valid", cfg.eval_max_samples)):
        spec = split_spec(cfg, split)
        opts = reader_options(spec, image_dir=cfg.image_dir, on_bad_record=cfg.on_bad_record,
                              with_images=False)  # fmt: skip
        recs = list(load_dataset(spec, split, **opts))[:cap]
        texts = [r.text + "\n" + ", ".join(r.keyphrases) for r in recs]
        for rec, ids in zip(recs, tok(texts)["input_ids"] if texts else []):  # one batched call
            n = len(ids)
            if n > limit:
                raise DataError(
                    f"{rec.where}: the post's text and keyphrases alone are {n} tokens, over the "
                    f"model's context of {limit} (max_position_embeddings); shorten or remove it"
                )


def _best_and_last(summary: dict[str, Any]) -> str:
    """The final line's checkpoints: only those written (``--no-eval`` writes no ``best``)."""
    out = pathlib.Path(summary["output"])
    written = [str(out / n) for n in ("best", "last") if (out / n).is_dir()]
    where = f"checkpoints in {' and '.join(written)}" if written else "no checkpoint written"
    if summary.get("best_epoch") is None:
        return f"no validation score (no best checkpoint); {where}"
    return f"best valid score {summary['best_score']} at epoch {summary['best_epoch']}; {where}"
