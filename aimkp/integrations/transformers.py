"""AimKP as a ``transformers.Trainer``: the Trainer's loop, logging, checkpoints and DDP, with
the AimKP micro-step (:func:`aimkp.method.step.aimkp_step`) as its training step.

>>> loaded = load_model("tiny-llava", train_texts=texts); apply_lora(loaded, r=8)
>>> trainer = AimKPTrainer(loaded, args=TrainingArguments(...), aimkp_args=AimKPArguments(),
...                        train_dataset=to_hf(records))
>>> trainer.train()

What is overridden, and why (everything else is Trainer's own):

- ``training_step`` runs the AimKP step: the PMM copies, one forward and ONE backward under the
  per-sample gradient engine, the filter and the exact reweight of ``.grad``; it returns the
  detached loss, so Trainer neither scales nor backpropagates again. Under DDP the model's DDP
  forward never runs (the step calls the adapter's modules), so DDP reduces nothing; the
  gradients are summed over the ranks by hand after the last micro-step of an optimizer step
  (``accelerator.sync_gradients``), as ``aimkp train`` does, because the reweight must happen
  before the ranks' gradients meet. Trainer then clips, steps AdamW and the schedule.
- ``get_batch_samples`` counts ``num_items_in_batch`` as the answer tokens of the whole
  accumulated batch over every rank (the own loop's ``n_total``): every loss weight divides by it.
- ``get_train_dataloader`` yields the own loop's order: a permutation seeded with
  ``seed + epoch``, each global batch of ``batch * grad_accum * world`` samples shared rank by
  rank (:class:`AimKPBatchSampler`), rows encoded by the adapter (:class:`AimKPCollator`).
- ``create_optimizer``: aimkp's AdamW groups (projector at ``projector_lr``), as ``aimkp train``
  builds them. The schedule is Trainer's own: ``lr_scheduler_type="cosine"`` with
  ``warmup_steps=RATIO`` is ``aimkp train``'s (both ``get_cosine_schedule_with_warmup``).
- The PMM stride table lives in :class:`AimKPCallback`: reconciled across ranks at each epoch end,
  saved as ``aimkp_strides.pt`` in each checkpoint folder, restored by
  ``train(resume_from_checkpoint=...)``; kept-copy rates are added to Trainer's log lines.
- Under accelerate's FSDP2 plugin (``fsdp=True, fsdp_config={"version": 2}``) the model is
  sharded at construction in ``aimkp train --fsdp``'s units
  (:func:`aimkp.train.fsdp.shard_for_rows`, the model itself the root unit), so accelerate's
  ``prepare`` finds it sharded and keeps it: its own units (embeddings, the LM head, the root
  around the model's forward) would never be gathered, since the step calls the model's parts.
  The copies are weighted by the correction pass, the ranks run their passes in lockstep, FSDP2
  reduce-scatters the summed gradients, and Trainer's own FSDP2 checkpoints save and resume.
  accelerate 1.16 enables its FSDP plugin only on accelerator devices; on the CPU (gloo) the
  Trainer enables it itself.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from aimkp.choices import check_choices
from aimkp.data.hf import from_hf
from aimkp.errors import CheckpointError, UsageError
from aimkp.method.options import StepOptions
from aimkp.method.pmm import StrideTable
from aimkp.method.step import aimkp_step
from aimkp.models.adapter import EncodedSample
from aimkp.models.forward import use_masked_embedding_module
from aimkp.train.config import TrainConfig
from aimkp.train.distributed import (
    DistContext,
    all_reduce_grads,
    all_reduce_sum,
    broadcast_trainable,
)
from aimkp.train.fsdp import ModelRoot, catch_up, compute_dtype, shard_for_rows, zero_pass
from aimkp.train.run import build_optimizer
from aimkp.train.stats import EpochStats

if TYPE_CHECKING:
    from aimkp.models import EncodedSample, LoadedModel, MLLMAdapter

    # the mixin is only ever mixed into a Trainer: type-check it as one
    _TrainerBase = Trainer
else:
    _TrainerBase = object

STRIDES_FILE = "aimkp_strides.pt"


def strides_file(rank: int, world: int) -> str:
    """``aimkp_strides.pt`` in one process; ``aimkp_strides-rank-R.pt`` for rank R of several."""
    return STRIDES_FILE if world == 1 else f"aimkp_strides-rank-{rank}.pt"


__all__ = [
    "AimKPArguments",
    "AimKPBatchSampler",
    "AimKPCallback",
    "AimKPCollator",
    "AimKPTrainer",
    "AimKPTrainerMixin",
    "as_records",
]


@dataclass
class AimKPArguments:
    """The AimKP options of a Trainer run (``aimkp train``'s flags of the same names)."""

    tau_text: float = field(default=0.1, metadata={"help": "GF threshold of text-masked copies"})
    tau_image: float = field(default=0.4, metadata={"help": "GF threshold of image copies"})
    gf_reduce: str = field(default="mean", metadata={"help": "kept copies: mean or sum"})
    grand_threshold: float | None = field(
        default=None, metadata={"help": "prune samples whose gradient norm is below this"}
    )
    mask_mode: str = field(default="compact", metadata={"help": "compact or attention rows"})
    reweight: str = field(
        default="auto", metadata={"help": "weighting after the filter: auto, stash or correction"}
    )
    projector_lr: float = field(default=2e-5, metadata={"help": "learning rate of the projector"})

    def __post_init__(self) -> None:
        check_choices(self, UsageError)

    def step_options(
        self, device: torch.device | str, bf16: bool, fsdp: bool = False
    ) -> StepOptions:
        """The AimKP step's options on ``device`` (bf16 autocast with Trainer's ``bf16``; under
        FSDP2 the copies are weighted by the correction pass, as ``aimkp train --fsdp`` does)."""
        amp_dtype = torch.bfloat16 if bf16 else None
        if not fsdp:
            return StepOptions.from_fields(self, device=device, amp_dtype=amp_dtype)
        if self.reweight == "stash":
            raise UsageError(
                "AimKPArguments(reweight='stash') under FSDP: after an FSDP2 backward .grad is "
                "the sharded, reduce-scattered gradient; use reweight='correction' (or 'auto')"
            )
        return StepOptions.from_fields(
            self, device=device, amp_dtype=amp_dtype, reweight="correction"
        )


def as_records(dataset: Any) -> list:
    """Records of a ``datasets.Dataset`` (columns of :func:`aimkp.data.to_hf`), or ``dataset``
    itself when it already holds :class:`aimkp.data.Record` s."""
    if hasattr(dataset, "column_names"):
        return list(from_hf(dataset))
    return list(dataset)


class EncodedRows(torch.utils.data.Dataset):
    """Records encoded by the adapter on first use (then cached): item ``i`` is
    ``(i, EncodedSample)``."""

    def __init__(self, records: Sequence[Any], adapter: MLLMAdapter) -> None:
        self.records, self.adapter = list(records), adapter
        self._cache: dict[int, EncodedSample] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, EncodedSample]:
        if i not in self._cache:
            self._cache[i] = self.adapter.encode(self.records[i])
        return i, self._cache[i]


class AimKPCollator:
    """``[(index, EncodedSample)]`` -> ``{"samples": [...], "indices": [...]}`` (a micro-batch);
    rows that are not encoded yet (Records) are encoded with ``adapter``."""

    def __init__(self, adapter: MLLMAdapter) -> None:
        self.adapter = adapter

    def __call__(self, features: Sequence[tuple[int, Any]]) -> dict[str, list]:
        samples = [
            s if isinstance(s, EncodedSample) else self.adapter.encode(s) for _, s in features
        ]
        return {"samples": samples, "indices": [int(i) for i, _ in features]}


class AimKPBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of ``aimkp train``'s order: per epoch a permutation of ``n``
    seeded with ``seed + epoch``; global batches of ``batch * grad_accum * world`` samples, rank
    ``r`` takes every ``world``-th sample from ``r`` and cuts it into micro-batches of ``batch``.

    A short last global batch gives some ranks fewer micro-batches, which Trainer handles (the
    gradients are summed once per optimizer step); with fewer than ``world`` samples in it some
    rank would have no micro-batch and one optimizer step less than the others, so keep
    ``n % (batch * grad_accum * world)`` 0 or at least ``world`` under DDP. ``lockstep`` (FSDP2,
    where every rank must run every pass): each rank gets as many micro-batches as rank 0 (the
    largest share), the missing ones empty."""

    def __init__(
        self,
        n: int,
        batch: int,
        grad_accum: int,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        lockstep: bool = False,
    ) -> None:
        self.n, self.batch, self.grad_accum = n, batch, grad_accum
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        self.lockstep = lockstep

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _micro_batches(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        gb = self.batch * self.grad_accum * self.world
        out = []
        for s in range(0, self.n, gb):
            share = order[s : s + gb][self.rank :: self.world]
            most = len(order[s : s + gb][0 :: self.world]) if self.lockstep else len(share)
            out += [share[m : m + self.batch] for m in range(0, most, self.batch)]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._micro_batches())

    def __len__(self) -> int:
        return len(self._micro_batches())


class _EpochLoader(torch.utils.data.DataLoader):
    """A DataLoader whose ``set_epoch`` (called by Trainer every epoch) reaches its sampler."""

    def __init__(self, rows: EncodedRows, sampler: AimKPBatchSampler, collate_fn: Any) -> None:
        super().__init__(rows, batch_sampler=sampler, collate_fn=collate_fn)
        self.aimkp_sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.aimkp_sampler.set_epoch(epoch)


class AimKPCallback(TrainerCallback):
    """Owns the PMM stride table and the kept-copy counts between two log lines."""

    def __init__(self, n_samples: int) -> None:
        self.strides = StrideTable(n_samples)
        self.stats = EpochStats()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.strides.reconcile()  # every rank visited its own share of the samples

    def on_save(self, args, state, control, **kwargs):
        # every rank its own table: a checkpoint inside an epoch (or at its last step, before
        # on_epoch_end reconciles) holds each rank's visits to its own share of the samples
        rank, world = _world()
        if abs(state.epoch - round(state.epoch)) < 1e-9:  # the epoch's last step: before
            self.strides.reconcile()  # on_epoch_end, so a resumed run starts reconciled too
        if world > 1 or state.is_world_process_zero:
            folder = pathlib.Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.strides.state_dict(), folder / strides_file(rank, world))

    def load(self, checkpoint: str | os.PathLike[str]) -> None:
        """Restore this rank's strides saved in a checkpoint folder (CheckpointError when
        missing or unreadable)."""
        path = pathlib.Path(checkpoint) / strides_file(*_world())
        try:
            state = torch.load(path, weights_only=True)
            self.strides.load_state_dict(state)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot restore the PMM strides ({exc})") from None

    def rates(self) -> dict[str, float]:
        """Kept-copy rates and copy counts since the last call (this rank's counts)."""
        s, self.stats = self.stats, EpochStats()
        row = s.as_row(epoch=0, step=0, lr=0.0, seconds=1.0, n_samples=0)
        keys = ("text_copies", "text_kept_rate", "image_copies", "image_kept_rate")
        return {
            k: float(row[k]) for k in keys if not (isinstance(row[k], float) and math.isnan(row[k]))
        }


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _dist_context():
    rank, world = _world()
    backend = torch.distributed.get_backend() if world > 1 else None
    return DistContext(rank=rank, world_size=world, backend=backend)


def enable_fsdp_plugin(trainer: Any) -> None:
    """Turn accelerate's FSDP plugin on where accelerate 1.16 leaves it off: on the CPU (gloo),
    where it would run plain data parallelism instead, and in a single process (refused: FSDP2
    needs torchrun's process group). aimkp's sharding is device-agnostic (``aimkp train --fsdp``
    runs on gloo), so the Trainer does what accelerate does on a GPU: the FSDP distributed type
    with the plugin TrainingArguments built."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise UsageError(
            "AimKPTrainer with fsdp: launch with torchrun (FSDP2 needs a process group)"
        )
    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = state.distributed_type  # as accelerate does
    trainer.is_fsdp_enabled = True


def lora_dropout(model: torch.nn.Module) -> float:
    """The largest LoRA dropout probability of ``model`` (peft's ``lora_dropout`` modules)."""
    return max(
        (m.p for n, m in model.named_modules()
         if ".lora_dropout." in n and isinstance(m, torch.nn.Dropout)),
        default=0.0,
    )  # fmt: skip


def shard_trainer_model(trainer: Any) -> ModelRoot:
    """Shard ``trainer.loaded.model`` in ``aimkp train --fsdp``'s units, the model itself the
    root (UsageError for accelerate's FSDP1: the step needs FSDP2's module hooks)."""
    plugin = trainer.accelerator.state.fsdp_plugin
    if int(getattr(plugin, "fsdp_version", 1)) != 2:
        raise UsageError(
            "AimKPTrainer runs under FSDP2 only: set fsdp_config={'version': 2} "
            "(FSDP1 wraps parameters into flat buffers the per-sample engine cannot read)"
        )
    loaded, device = trainer.loaded, torch.device(trainer.args.device)
    dropout = lora_dropout(loaded.model)
    if dropout:
        raise UsageError(
            f"AimKPTrainer under FSDP2 with LoRA dropout {dropout:g}: the copies are weighted by "
            "the correction pass, whose second forward draws other dropout masks, so the kept "
            "copies' weights would not be exact; apply LoRA with dropout 0"
        )
    broadcast_trainable(loaded.model, _dist_context())  # every rank starts from rank 0's weights
    # gathered in the frozen base's half dtype or bf16 on CUDA, reduced in fp32: aimkp's policy
    # rather than the plugin's, whose reduce dtype follows bf16 (the ranks' gradients are summed)
    half = compute_dtype(loaded.model, trainer.args.bf16, device)
    rows = shard_for_rows(loaded, loaded.model, device, half, plugin.reshard_after_forward)
    root = ModelRoot(loaded.model, rows)
    loaded.row_runner = root  # the step's row forward runs as the root's forward
    return root


class AimKPTrainerMixin(_TrainerBase):
    """Mix into a ``transformers.Trainer`` subclass (``Trainer``, TRL's ``SFTTrainer``) before
    the Trainer class: ``class T(AimKPTrainerMixin, SFTTrainer)``. Takes the
    :class:`~aimkp.models.LoadedModel` first, the Trainer's own arguments after it."""

    def __init__(
        self,
        loaded: LoadedModel,
        args: Any = None,
        aimkp_args: AimKPArguments | None = None,
        train_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        if loaded.adapter.embed_tokens.weight.requires_grad:
            use_masked_embedding_module(loaded)  # the engine must see the table's rows
        self.loaded = loaded
        self.aimkp_args = aimkp_args or AimKPArguments()
        # Trainer keeps the dataset as given (TRL's SFTTrainer wants a datasets.Dataset); the
        # training data loader reads these encoded rows of it instead
        self.aimkp_rows = EncodedRows(
            [] if train_dataset is None else as_records(train_dataset), loaded.adapter
        )
        self.aimkp_callback = AimKPCallback(len(self.aimkp_rows))
        callbacks = [*(kwargs.pop("callbacks", None) or []), self.aimkp_callback]
        kwargs.setdefault("data_collator", AimKPCollator(loaded.adapter))
        super().__init__(
            model=loaded.model,
            args=args,
            train_dataset=train_dataset,
            callbacks=callbacks,
            **kwargs,
        )
        self.aimkp_fsdp = shard_trainer_model(self) if self.is_fsdp_enabled else None

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            enable_fsdp_plugin(self)

    @property
    def strides(self) -> StrideTable:
        return self.aimkp_callback.strides

    # -- data ------------------------------------------------------------------------------
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        rank, world = _world()
        a = self.args
        sampler = AimKPBatchSampler(
            len(self.aimkp_rows),
            a.per_device_train_batch_size,
            a.gradient_accumulation_steps,
            seed=a.seed,
            rank=rank,
            world=world,
            lockstep=self.aimkp_fsdp is not None,
        )
        return _EpochLoader(self.aimkp_rows, sampler, self.data_collator)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and the answer tokens of all of them, summed
        over the ranks (the own loop's ``n_total``)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break

        local = sum(int(s.n_answer_tokens) for b in batches for s in b["samples"])
        return batches, int(all_reduce_sum([local], _dist_context())[0])

    # -- optimizer -------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            cfg = TrainConfig(
                lr=self.args.learning_rate,
                projector_lr=self.aimkp_args.projector_lr,
                weight_decay=self.args.weight_decay,
            )
            self.optimizer = build_optimizer(self.loaded.model, cfg, self.loaded.adapter.projector)
        return self.optimizer

    # -- the step --------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The AimKP micro-step: ``.grad`` gains its share of the global batch's gradient; the
        ranks' gradients are summed after the last micro-step (by FSDP2's reduce-scatter under
        FSDP). Returns the detached loss (the micro-step's share of the global batch's mean
        answer CE, times the world size, so that Trainer's mean over ranks logs the global
        mean)."""
        model.train()
        n_total = float(num_items_in_batch)
        fsdp = self.aimkp_fsdp
        opts = self.aimkp_args.step_options(self.args.device, self.args.bf16, fsdp is not None)
        ctx = _dist_context()
        before = 0 if fsdp is None else fsdp.passes
        samples, indices = inputs["samples"], inputs["indices"]
        share = 0.0
        if samples:  # under FSDP a short share's micro-batch can be empty
            res = aimkp_step(self.loaded, samples, indices, self.strides, n_total, opts)
            self.aimkp_callback.stats.add(res)
            share = res.loss * res.n_answer_tokens / n_total * ctx.world_size
        if fsdp is not None:  # every rank as many passes as the busiest (lockstep)
            pad = self.aimkp_rows[0][1]
            catch_up(fsdp.passes - before, ctx, False, lambda: zero_pass(self.loaded, pad, opts))
        elif self.accelerator.sync_gradients:
            all_reduce_grads(self.loaded.model.parameters(), ctx)
        return torch.tensor(share, device=self.args.device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # training log lines (not the end-of-training summary)
            logs = {**logs, **self.aimkp_callback.rates()}
        super().log(logs, *args, **kwargs)

    def train(  # type: ignore[override]  # Trainer's extra arguments pass through **kwargs
        self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any
    ) -> TrainOutput:
        """Trainer's ``train``; on resume also restores the PMM strides of that checkpoint."""
        if resume_from_checkpoint:
            ckpt = resume_from_checkpoint
            if ckpt is True:
                ckpt = get_last_checkpoint(self.args.output_dir)
            if ckpt:
                self.aimkp_callback.load(ckpt)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class AimKPTrainer(AimKPTrainerMixin, Trainer):
    """``transformers.Trainer`` whose training step is the AimKP step (see the module doc)."""
