"""Set-up of one training run: devices and ranks, data, model, optimizer and schedule, resume.

:func:`set_up` builds a :class:`TrainRun` (everything the phases of the loop share) in a fixed
order (seeding, data, model, trainable parameters, optimizer), so that a run is reproducible;
:func:`resume` restores the saved training state into it.
"""

from __future__ import annotations

import logging
import math
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import get_cosine_schedule_with_warmup, set_seed

from aimkp.method.nonfinite import SkipGuard
from aimkp.method.options import StepOptions
from aimkp.method.pmm import StrideTable
from aimkp.models import load_model
from aimkp.models import precision as P
from aimkp.models.forward import use_masked_embedding_module
from aimkp.models.lora import apply_lora
from aimkp.runs.state import Progress
from aimkp.train import distributed as D
from aimkp.train.config import TrainConfig
from aimkp.train.data import load_split

if TYPE_CHECKING:
    from aimkp.data import Record
    from aimkp.models import EncodedSample, LoadedModel
    from aimkp.train.distributed import DataParallel, DistContext

log = logging.getLogger("aimkp.train")


@dataclass
class TrainRun:
    """Everything the phases of one run share (built by :func:`set_up`)."""

    cfg: TrainConfig
    out: pathlib.Path
    ctx: DistContext
    device: torch.device
    loaded: LoadedModel
    train_records: list[Record]
    valid_records: list[Record]
    samples: list[EncodedSample]  # the encoded training records
    strides: StrideTable | None  # AimKP's PMM schedule (None for SFT)
    step_options: StepOptions  # the micro-step's options, built once from cfg
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    global_batch: int  # samples per optimizer step over all ranks
    steps_per_epoch: int
    parallel: DataParallel  # how the ranks share the work (aimkp.train.distributed / .fsdp)
    progress: Progress = field(default_factory=Progress)
    best_state: dict[str, torch.Tensor] | None = None  # trainable weights of the best epoch
    resumed_changes: list[str] = field(default_factory=list)  # accepted by --allow-changed
    skip_guard: SkipGuard = field(default_factory=lambda: SkipGuard(10))  # non-finite steps
    grad_norm: torch.Tensor | None = (
        None  # the last step's total norm before clipping (per-step logs)
    )

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def stateful(self) -> dict[str, Any]:
        """What the training state saves and restores besides the progress: model, optimizer,
        schedule and strides (the keyword arguments of ``aimkp.runs.state``'s functions)."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "strides": self.strides,
        }

    @property
    def last_epoch(self) -> int:
        """The epoch this invocation stops after (``stop_after_epochs`` caps ``epochs``)."""
        cfg = self.cfg
        return (
            cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, cfg.stop_after_epochs)
        )


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The run's learning-rate schedule: transformers' linear warm-up (factor ``step / warmup``)
    then cosine decay to 0 at ``total_steps``, the schedule ``Trainer`` builds for
    ``lr_scheduler_type="cosine"`` (so :class:`aimkp.integrations.transformers.AimKPTrainer`
    runs the same one)."""
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, projector: torch.nn.Module
) -> torch.optim.Optimizer:
    """AdamW; the projector's parameters (the adapter's ``projector`` module) at
    ``projector_lr``, everything else trainable at ``lr``."""
    in_proj = {id(p) for p in projector.parameters()}
    main: list[torch.nn.Parameter] = []
    proj: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (proj if id(p) in in_proj else main).append(p)
    if not main and not proj:
        raise ValueError("the model has no trainable parameters")
    groups = []
    if main:
        groups.append({"params": main, "lr": cfg.lr})
    if proj:
        groups.append({"params": proj, "lr": cfg.projector_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _load_records(cfg: TrainConfig) -> tuple[list[Record], list[Record]]:
    train_recs = load_split(cfg, "train")[: cfg.max_train_samples]
    valid_recs = load_split(cfg, "valid")[: cfg.eval_max_samples]
    return train_recs, valid_recs


def _load_trainable_model(
    cfg: TrainConfig, train_recs: list[Record], device: torch.device
) -> LoadedModel:
    """The model with LoRA (or full fine-tuning) applied and the input embedding set up."""
    dtype = torch.bfloat16 if (cfg.bf16 and device.type == "cuda" and cfg.full_finetune) else None
    loaded = load_model(
        cfg.model,
        train_texts=[r.text for r in train_recs] + [", ".join(r.keyphrases) for r in train_recs],
        attn=cfg.attn,
        device=device,
        seed=cfg.seed,
        dtype=dtype,
    )
    apply_lora(
        loaded,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.resolved_lora_dropout,
        train_projector=True,
        full=cfg.full_finetune,
    )
    # the frozen base in --dtype (trainable weights stay fp32); optional activation checkpointing
    P.cast_frozen_base(loaded, P.resolve_dtype(cfg.dtype, device))
    if cfg.gradient_checkpointing:
        P.enable_gradient_checkpointing(loaded)
    if cfg.full_finetune and cfg.freeze_embeddings:
        loaded.adapter.embed_tokens.weight.requires_grad_(False)
        log.info("full fine-tuning: input embedding frozen (--freeze-embeddings)")
    elif loaded.adapter.embed_tokens.weight.requires_grad:
        # the row forward then reads the table through the MaskedEmbedding module (same fused
        # op), whose calls the per-sample gradient engine hooks
        use_masked_embedding_module(loaded)
        log.info("input embedding trainable, read through aimkp.ops.MaskedEmbedding")
    return loaded


def set_up(cfg: TrainConfig) -> TrainRun:
    """Validate ``cfg``, join the ranks, seed, load data and model, build optimizer + schedule."""
    cfg.validate()
    out = pathlib.Path(cfg.output)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = D.init_distributed(device, cfg.dist_timeout, single_group=cfg.fsdp)
    device = D.rank_device(ctx, device)
    parallel = make_parallel(cfg, ctx, device)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)

    set_seed(cfg.seed)  # python, numpy, torch (and CUDA) generators
    train_recs, valid_recs = _load_records(cfg)
    loaded = _load_trainable_model(cfg, train_recs, device)
    model = loaded.model
    parallel.wrap(loaded)  # before the optimizer: FSDP2 replaces the parameters
    if ctx.enabled:
        torch.manual_seed(cfg.seed + 7919 * ctx.rank)  # own dropout masks per rank
    model.train()
    samples = [loaded.adapter.encode(r) for r in train_recs]
    options = step_options(cfg, device)
    log.info(
        "row mode: %s (--mask-mode %s, attention %s)", options.mask_mode, cfg.mask_mode, cfg.attn
    )
    global_batch = cfg.effective_batch * ctx.world_size
    steps_per_epoch = math.ceil(len(samples) / global_batch)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(model, cfg, loaded.adapter.projector)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = build_scheduler(optimizer, total_steps, warmup)
    return TrainRun(
        cfg=cfg,
        out=out,
        ctx=ctx,
        device=device,
        loaded=loaded,
        train_records=train_recs,
        valid_records=valid_recs,
        samples=samples,
        strides=StrideTable(len(samples)) if cfg.method == "aimkp" else None,
        step_options=options,
        optimizer=optimizer,
        scheduler=scheduler,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        parallel=parallel,
        skip_guard=SkipGuard(cfg.max_skipped_steps),
    )


def step_options(cfg: TrainConfig, device: torch.device) -> StepOptions:
    """The micro-step's options of ``cfg`` on ``device``; the autocast dtype is the frozen base's
    half dtype (``--dtype``), else bf16 with ``--bf16``."""
    amp_dtype = P.autocast_dtype(P.resolve_dtype(cfg.dtype, device), cfg.bf16)
    return StepOptions.from_fields(
        cfg, device=device, amp_dtype=amp_dtype, reweight=cfg.resolved_reweight
    )


def make_parallel(cfg: TrainConfig, ctx: D.DistContext, device: torch.device) -> D.DataParallel:
    """How the ranks share the work: :class:`aimkp.train.fsdp.FSDPParallel` with ``--fsdp``,
    else :class:`aimkp.train.distributed.DataParallel`."""
    if cfg.fsdp:
        # imported only here: torch.distributed.fsdp and its checkpoint modules take a while to
        # import, and a run without --fsdp never needs them
        from aimkp.train.fsdp import FSDPParallel

        return FSDPParallel(cfg, ctx, device)
    return D.DataParallel(cfg, ctx, device)


def resume(run: TrainRun, st: dict[str, Any], directory: str) -> None:
    """Restore weights, optimizer, schedule, strides, RNG and progress from the training state
    ``st`` read from ``directory``."""
    run.parallel.restore(run, st, directory)
    run.progress = Progress(
        epoch=int(st["epoch"]),
        step=int(st["step"]),
        best_score=st["best_score"],
        best_epoch=st["best_epoch"],
        history=list(st["history"]),
        epoch_step=int(st.get("epoch_step", 0)),
        partial=st.get("partial"),
    )
    log.info(
        "resumed from %s at epoch %d, step %d (%d into the epoch)",
        directory,
        run.progress.epoch,
        run.progress.step,
        run.progress.epoch_step,
    )


def log_start(run: TrainRun) -> None:
    """One log line describing the run."""
    cfg = run.cfg
    n_trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    log.info(
        "train: %s on %s, %d samples, %d trainable params, %d steps x %d samples "
        "(%d ranks), device %s, %d CPU threads",
        cfg.method,
        cfg.model,
        len(run.samples),
        n_trainable,
        run.steps_per_epoch * cfg.epochs,
        run.global_batch,
        run.ctx.world_size,
        run.device,
        torch.get_num_threads(),
    )
