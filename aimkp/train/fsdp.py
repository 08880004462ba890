"""Sharded data parallelism with FSDP2 (``torchrun --nproc_per_node N -m aimkp train ... --fsdp``).

Every rank holds ``1/N`` of every weight, gradient and AdamW moment (``fully_shard``: one unit per
decoder layer, one for the vision tower, the rest (embeddings, projector, final norm, LM head) at
the root). A unit's weights are all-gathered for its forward and again for its backward, and its
gradients reduce-scattered. What the batch does is the data-parallel scheme of
:mod:`aimkp.train.distributed`: the same global batch on every rank, rank ``r`` trains on samples
``r, r + N, ...`` of it, every loss weight divided by the answer tokens of the whole global batch,
so the summed (not averaged: ``set_gradient_divide_factor(1)``) reduce-scatter is the gradient of
the global batch.

How AimKP's pieces run sharded:

- The per-sample engine hooks modules, never parameters (FSDP2 never calls parameter hooks on its
  sharded parameters); its forward hooks see the full activations and its output-gradient hooks
  the full output gradients, and it reads only the weights' (global) shapes. Each rank's per-row
  norms, dots and cosines cover its own rows completely: a row is never split across ranks, so
  there is nothing to reduce and the filter decides per rank exactly as one process would.
  (The engine's safety net for a parameter used outside its module's forward, a
  post-accumulate-grad hook, is inert on sharded parameters; the row forward uses none.)
- The copies' final weights are applied by the correction pass (``--reweight correction``, forced
  by ``--fsdp``): after an FSDP2 backward ``.grad`` is the sharded reduce-scattered gradient, which
  the stash could not rescale; the correction is one more forward + backward with weights
  ``w - w0``, reduced like any other.
- Lockstep: every forward and backward all-gathers every unit, so all ranks must run the same
  number of passes. A rank runs as many micro-steps as rank 0 (the largest share), and after each
  micro-step the ranks agree on the most passes any of them ran (a correction pass runs only
  where a copy was rejected) and the others run that many zero-weight passes (``0 * loss``: their
  gradient is exactly zero). For the same reason a non-finite loss does not skip the backward (as
  it does in one process): the backward runs, the gradient is non-finite and the optimizer step
  is skipped (:class:`aimkp.method.nonfinite.SkipGuard`).
- Accumulation: ``set_requires_gradient_sync(False)`` for every micro-step but the last, so the
  gradients are reduce-scattered once per optimizer step (each rank keeps unsharded gradients of
  the trainable weights in between).
- The vision tower is frozen and called only for rows with an image, so each pass all-gathers it
  explicitly (the ranks' rows differ) and reshards it after the forward.
- Non-finite check and clipping: the squared norms and non-finite counts of the local shards,
  all-reduced once; the global norm clips the local shards (what ``clip_grad_norm_`` does).
- Checkpoints: ``OUTPUT/last`` holds the consolidated model in today's formats (written by rank 0
  from ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` loaded into a plain copy of
  the model kept on the meta device), the trainable weights and AdamW state sharded with
  ``torch.distributed.checkpoint`` (``dcp/``), and each rank's RNG and stride tables
  (``rank-R.pt``); the directory is written under a temporary name and swapped in whole by rank 0
  after a barrier. ``OUTPUT/best`` and validation use the same consolidated copy on rank 0.

The frozen base is sharded like the trainable weights (LoRA re-gathers it every pass): the point of
``--fsdp`` is a base that does not fit one device; a LoRA run whose base fits is cheaper under
plain data parallelism (no ``--fsdp``). See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import pathlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from aimkp.atomic import apply_umask, fsync_tree, no_space_is_usage_error, swap_in
from aimkp.errors import CheckpointError, NonFiniteError, UsageError
from aimkp.method.nonfinite import check_finite_weights
from aimkp.method.pmm import Copy
from aimkp.method.rows import forward_losses, plan_rows
from aimkp.models.checkpoint import is_peft_model
from aimkp.models.forward import forward_rows
from aimkp.runs import state as S
from aimkp.runs.checkpoints import save_step_copy, write_model_files, write_train_state
from aimkp.train.distributed import DataParallel, DistContext, broadcast_trainable

if TYPE_CHECKING:
    from aimkp.method.options import StepOptions
    from aimkp.models import EncodedSample, LoadedModel, RowBatch, RowLosses
    from aimkp.train.config import TrainConfig
    from aimkp.train.run import TrainRun

log = logging.getLogger("aimkp.train")

__all__ = [
    "FSDPParallel",
    "ModelRoot",
    "RowPasses",
    "RowRunner",
    "shard_for_rows",
    "sharded_frozen_checksum",
]

DCP_DIR = "dcp"
RANK_FILE = "rank-{}.pt"
TMP_LAST = ".last.tmp-fsdp"  # matches aimkp.atomic.recover's pattern: a killed writer's is removed


class RowPasses:
    """Runs rows through a sharded model (:func:`aimkp.models.forward.forward_rows`) and counts
    the passes with grad (each is followed by its backward: the lockstep's unit).

    The frozen vision tower runs only for rows with an image and the ranks' rows differ, so its
    units are all-gathered explicitly around every pass, on every rank alike."""

    def __init__(self, loaded: LoadedModel, tower: Sequence[FSDPModule]) -> None:
        self.loaded, self.tower, self.passes = loaded, list(tower), 0

    def __call__(self, batch: RowBatch) -> RowLosses:
        if torch.is_grad_enabled():
            self.passes += 1
        for block in self.tower:
            block.unshard()
        out = forward_rows(self.loaded, batch)
        for block in self.tower:
            block.reshard()
        return out


class RowRunner(nn.Module):
    """FSDP2's root module of ``aimkp train --fsdp``: ``forward(batch)`` runs the rows.

    The row forward calls the model's parts directly (embedding op, vision tower, projector,
    decoder stack, LM head), never the model's own forward; FSDP2 gathers a unit in its module's
    pre-forward hook, so the parameters outside the decoder layers and the tower need a root
    module whose forward is the row forward."""

    rows: RowPasses  # set by FSDPParallel.wrap once the tower's units exist

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.model = loaded.model

    @property
    def passes(self) -> int:
        return self.rows.passes

    def forward(self, batch: RowBatch) -> RowLosses:
        return self.rows(batch)


class ModelRoot:
    """The row runner when the model itself is FSDP2's root unit (:class:`AimKPTrainer
    <aimkp.integrations.transformers.AimKPTrainer>`, whose Trainer saves and loads the model
    as it is). The rows run AS the root's forward (an instance attribute for the length of the
    call), so FSDP2's hooks around it gather the root's weights and reduce-scatter their
    gradients, exactly as :class:`RowRunner` does."""

    def __init__(self, root: nn.Module, rows: RowPasses) -> None:
        self.root, self.rows = root, rows

    @property
    def passes(self) -> int:
        return self.rows.passes

    def __call__(self, batch: RowBatch) -> RowLosses:
        object.__setattr__(self.root, "forward", self.rows)  # nn.Module.__call__ runs .forward
        try:
            return self.root(batch)
        finally:
            object.__delattr__(self.root, "forward")


def _decoder_layers(loaded: LoadedModel) -> list[nn.Module]:
    layers = getattr(loaded.adapter.language_model, "layers", None)
    if layers is None:
        raise UsageError(
            f"--fsdp: {type(loaded.adapter.language_model).__name__} has no .layers to shard"
        )
    return list(layers)


def _vision_blocks(loaded: LoadedModel) -> list[nn.Module]:
    """The vision tower's blocks (its largest ``ModuleList``: CLIP's encoder layers, Qwen2-VL's
    blocks); [] without a tower. The blocks are sharded rather than the tower module: a tower
    wrapped whole loses transformers' output capturing (its hidden states come back None)."""
    try:
        tower = loaded.adapter.vision_tower
    except NotImplementedError:
        return []
    if any(p.requires_grad for p in tower.parameters()):
        raise UsageError("--fsdp: the vision tower must be frozen (AimKP trains the projector)")
    lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    largest: nn.ModuleList = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(largest)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters live on the meta device (no memory; buffers are
    copied: rotary tables and the like are not in the state dict). Ties are kept."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def _params_to_meta(model: nn.Module) -> None:
    """Free the parameters of a consolidated copy (back to the meta device, ties kept)."""
    seen: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in seen:
                seen[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
            mod._parameters[name] = seen[id(p)]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def sharded_frozen_checksum(model: nn.Module, ctx: DistContext) -> float:
    """:func:`aimkp.runs.state.frozen_checksum` of a sharded model: each parameter's sum and sum
    of absolute values over the local shards, summed over the ranks (float64)."""
    named = [(n, p) for n, p in model.named_parameters() if ".original_module." not in n]
    parts = torch.zeros(len(named), 2, dtype=torch.float64)
    with torch.no_grad():
        for k, (_, p) in enumerate(named):
            if not p.requires_grad:
                t = _local(p.detach()).double()
                parts[k, 0], parts[k, 1] = t.sum().cpu(), t.abs().sum().cpu()
    if ctx.enabled:
        parts = _all_reduce(parts, ctx)
    total = 0.0
    for k in range(len(named)):
        if not named[k][1].requires_grad:
            total += (k + 1) * float(parts[k, 0]) + float(parts[k, 1])
    return total


def _all_reduce(t: torch.Tensor, ctx: DistContext, op: Any = None) -> torch.Tensor:
    dev = t.device
    if ctx.backend == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t.to(dev)


def compute_dtype(model: nn.Module, bf16: bool, device: torch.device) -> torch.dtype | None:
    """The dtype units are gathered in: the frozen base's half dtype when it has one, bf16
    with ``bf16`` on CUDA, else None (the weights' own dtype, fp32)."""
    halves = {p.dtype for p in model.parameters()} & {torch.bfloat16, torch.float16}
    if halves:
        return torch.bfloat16 if torch.bfloat16 in halves else torch.float16
    if bf16 and device.type == "cuda":
        return torch.bfloat16
    return None


def shard_for_rows(
    loaded: LoadedModel,
    root: nn.Module,
    device: torch.device,
    half: torch.dtype | None = None,
    reshard_after_forward: bool | None = None,
) -> RowPasses:
    """``fully_shard`` every decoder layer and every vision-tower block, then ``root`` (which
    holds the rest: embeddings, projector, final norm, LM head) over all ranks; returns the
    :class:`RowPasses` that runs the rows through them. ``half``: gather in that dtype (a half
    frozen base, or bf16 autocast), gradients are reduced in fp32 either way;
    ``reshard_after_forward``: of the layers and blocks (the root keeps torch's default)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    kw: dict[str, Any] = {"mesh": init_device_mesh(device.type, (world,))}
    if half is not None:
        # a half frozen base (--dtype) and fp32 trainable weights share units: gathered in
        # the half dtype (autocast's compute dtype), gradients reduced in fp32
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
    layers = _decoder_layers(loaded)
    blocks = _vision_blocks(loaded)
    for module in [*layers, *blocks]:  # None: torch's default (True below the root)
        fully_shard(module, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(root, **kw)
    for unit in [*layers, *blocks, root]:
        assert isinstance(unit, FSDPModule)
        # summed over the ranks: every loss weight divides by the global batch's tokens
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        # every rank reduce-scatters every trainable weight, used by its rows or not
        unit.set_reduce_scatter_unused_params(True, recurse=False)
    log.info(
        "fsdp: %d decoder layers and %d vision blocks sharded over %d ranks (%s)",
        len(layers),
        len(blocks),
        world,
        f"gathered in {half or 'the weights dtype'}, reduced in fp32",
    )
    return RowPasses(loaded, [b for b in blocks if isinstance(b, FSDPModule)])


def zero_pass(loaded: LoadedModel, sample: EncodedSample, opts: StepOptions) -> None:
    """A forward + backward whose gradient is exactly zero (``0 * loss``): what a rank runs to
    keep in step with a busier one."""
    plan = plan_rows(loaded, [sample], [Copy(0, None, 1)], 1.0, opts)
    out = forward_losses(loaded, plan.batch, opts)
    (out.loss_sum * 0.0).sum().backward()


def catch_up(ran: int, ctx: DistContext, fixed: bool, pad: Callable[[], None]) -> None:
    """After a micro-step that ran ``ran`` passes: ``pad()`` until this rank ran as many as the
    busiest rank. ``fixed``: every rank runs the same count (SFT: one pass), nothing to ask."""
    if fixed:
        most = 1
    else:  # AimKP: a correction pass runs only where a copy was rejected
        t = torch.tensor([ran], dtype=torch.float64)
        most = int(_all_reduce(t, ctx, dist.ReduceOp.MAX)) if ctx.enabled else ran
    for _ in range(most - ran):
        pad()


class FSDPParallel(DataParallel):
    """The ``--fsdp`` strategy: the hooks the loop calls (see :class:`DataParallel`)."""

    name = "fsdp"

    def __init__(self, cfg: TrainConfig, ctx: DistContext, device: torch.device) -> None:
        super().__init__(cfg, ctx, device)
        self.runner: RowRunner | None = None
        self.mirror: nn.Module | None = None  # rank 0: a plain copy for checkpoints / validation
        self._sq_norm: torch.Tensor | None = None
        self._lora_saved_once = False  # see consolidated()

    # ------------------------------------------------------------------------------- set-up
    def wrap(self, loaded: LoadedModel) -> None:
        """Shard ``loaded.model`` in place (every rank starts from rank 0's weights)."""
        broadcast_trainable(loaded.model, self.ctx)
        if self.ctx.is_main:
            self.mirror = meta_copy(loaded.model)
        runner = RowRunner(loaded)
        half = compute_dtype(loaded.model, self.cfg.bf16, self.device)
        runner.rows = shard_for_rows(loaded, runner, self.device, half)
        self.runner = runner
        loaded.row_runner = runner  # the step's row forward runs here (aimkp.method.rows)

    # ----------------------------------------------------------------------- accumulation
    def micro_batches(
        self, idx: Sequence[int], global_size: int, batch_size: int
    ) -> Iterator[tuple[list[int], bool]]:
        """As many micro-steps as rank 0 (the largest share) has; a shorter share gets empty
        ones (only lockstep passes run there)."""
        most = math.ceil(global_size / self.ctx.world_size)
        n = max(1, math.ceil(most / batch_size))
        for m in range(n):
            yield list(idx[m * batch_size : (m + 1) * batch_size]), m == n - 1

    @contextlib.contextmanager
    def micro_step(self, run: TrainRun, last: bool, pad_sample: int) -> Iterator[None]:
        """Gradient sync only on the last micro-step; afterwards zero-weight passes until every
        rank ran as many passes as the busiest one."""
        runner = self.runner
        assert runner is not None
        assert isinstance(runner, FSDPModule)  # fully_shard made it one (wrap)
        runner.set_requires_gradient_sync(last)
        before = runner.passes
        yield
        sample = run.samples[pad_sample]
        catch_up(
            runner.passes - before,
            self.ctx,
            fixed=run.strides is None,
            pad=lambda: zero_pass(run.loaded, sample, run.step_options),
        )

    # ------------------------------------------------------------------- optimizer step
    def reduce_grads(self, params: Sequence[nn.Parameter], used_rows: int) -> tuple[bool, float]:
        """The gradients are reduce-scattered already: one all-reduce of (squared norm of the
        local shards, their non-finite entries, rows used); True when the global gradient is
        finite."""
        sq = torch.zeros((), dtype=torch.float64)
        bad = 0
        for p in params:
            if p.grad is None:
                continue
            g = _local(p.grad).detach()
            bad += int((~torch.isfinite(g)).sum())
            sq += torch.linalg.vector_norm(g.float()).double().square().cpu()
        t = torch.stack([sq, torch.tensor(float(bad), dtype=torch.float64),
                         torch.tensor(float(used_rows), dtype=torch.float64)])  # fmt: skip
        if self.ctx.enabled:
            t = _all_reduce(t, self.ctx)
        self._sq_norm = t[0]
        return bool(t[1] == 0) and bool(torch.isfinite(t[0])), float(t[2])

    def clip(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` over the sharded gradients: the global norm (from
        :meth:`reduce_grads`) scales every local shard by ``min(1, max_norm / (norm + 1e-6))``."""
        assert self._sq_norm is not None, "reduce_grads runs first"
        norm = self._sq_norm.sqrt().float()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    _local(p.grad).mul_(coef.to(_local(p.grad).device))
        return norm

    # ------------------------------------------------------------------------ checkpoints
    @contextlib.contextmanager
    def consolidated(self, run: TrainRun, on_device: bool = False) -> Iterator[LoadedModel | None]:
        """All ranks gather the full weights; rank 0 gets a :class:`LoadedModel` on a plain copy
        (on the CPU; on the run's device with ``on_device``, for validation), the others None.

        LoRA gathers only the trainable weights after the first time (when nothing validates):
        the adapter files hold nothing else, and the first save wrote the base copy a preset
        needs (``OUTPUT/base``), so a mid-epoch checkpoint of a 7B LoRA run does not move the
        frozen base to rank 0 again. The choice depends only on what every rank knows alike."""
        self._refuse_nonfinite(run)
        frozen_too = on_device or not self._lora_saved_once or not is_peft_model(run.model)
        full = get_model_state_dict(
            run.model,
            options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=not frozen_too
            ),
        )
        self._lora_saved_once = True
        if not self.ctx.is_main:
            yield None
            return
        mirror = self.mirror
        assert mirror is not None
        # without the frozen weights they stay on the meta device (the adapter files skip them)
        mirror.load_state_dict(full, assign=True, strict=frozen_too)
        del full
        if on_device:
            mirror.to(self.device)
        adapter = copy.copy(run.loaded.adapter)
        adapter.model = mirror
        view = dataclasses.replace(run.loaded, model=mirror, adapter=adapter, row_runner=None)
        try:
            yield view
        finally:
            _params_to_meta(mirror)

    def save_last(
        self, run: TrainRun, view: LoadedModel | None, partial: dict[str, Any] | None = None
    ) -> None:
        """``OUTPUT/last`` (collective): the consolidated model (rank 0), the sharded trainable
        weights and AdamW state (``dcp/``), every rank's RNG and strides, the training state;
        written under a temporary name, swapped in whole by rank 0 after a barrier."""
        ctx, out = self.ctx, run.out
        tmp = out / TMP_LAST
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        ctx.barrier()
        with no_space_is_usage_error(tmp):  # a full disk: one line naming the file, exit 2
            self._write_last(run, view, tmp, partial)
        ctx.barrier()

    def _write_last(
        self,
        run: TrainRun,
        view: LoadedModel | None,
        tmp: pathlib.Path,
        partial: dict[str, Any] | None,
    ) -> None:
        """Every rank its shards (``dcp/``) and ``rank-R.pt`` into ``tmp``; rank 0 then the model
        files and ``train_state.pt``, and swaps ``tmp`` in as ``OUTPUT/last``."""
        ctx, out = self.ctx, run.out
        msd, osd = get_state_dict(
            run.model, run.optimizer, options=StateDictOptions(ignore_frozen_params=True)
        )
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / DCP_DIR))
        torch.save(self._rank_state(run), tmp / RANK_FILE.format(ctx.rank))
        checksum = sharded_frozen_checksum(run.model, ctx)
        ctx.barrier()
        if ctx.is_main:
            assert view is not None
            p = run.progress
            extra = {"epoch": p.epoch, "epoch_step": p.epoch_step, "step": p.step}
            check_finite_weights(view.model, str(out / "last"))
            write_model_files(run, tmp, extra, view)
            sharded = {"format": "dcp", "world_size": ctx.world_size, "frozen_checksum": checksum}
            write_train_state(run, tmp, partial, sharded)
            apply_umask(tmp)  # what atomic_dir does for the other checkpoints
            fsync_tree(tmp)
            swap_in(tmp, out / "last")
            if run.cfg.keep_last:
                save_step_copy(out, p.step, run.cfg.keep_last)

    def _refuse_nonfinite(self, run: TrainRun) -> None:
        """NonFiniteError on every rank alike (before any gathering or writing) when a shard of a
        trainable weight holds a non-finite value: no checkpoint is written with one."""
        bad = sum(
            int((~torch.isfinite(_local(p.detach()))).sum())
            for p in run.model.parameters()
            if p.requires_grad
        )
        t = torch.tensor([float(bad)], dtype=torch.float64)
        if self.ctx.enabled:
            t = _all_reduce(t, self.ctx)
        if int(t.item()):
            raise NonFiniteError(
                f"refusing to write checkpoints under {run.out}: {int(t.item())} value(s) of the "
                "trainable weights are non-finite; lower --lr / --projector-lr or keep "
                "--max-grad-norm"
            )

    @staticmethod
    def _rank_state(run: TrainRun) -> dict[str, Any]:
        return {
            "rng": S.rng_state(),
            "strides": None if run.strides is None else run.strides.state_dict(),
        }

    def restore(self, run: TrainRun, st: dict[str, Any], directory: str) -> None:
        """Load what :meth:`save_last` wrote: the sharded weights and AdamW state, the schedule,
        this rank's strides and RNG."""
        sharded = st.get("sharded")
        if not sharded:
            raise CheckpointError(f"{directory}: the checkpoint was written without --fsdp")
        if int(sharded["world_size"]) != self.ctx.world_size:
            raise UsageError(
                f"--resume {directory}: written by {sharded['world_size']} ranks, resumed with "
                f"{self.ctx.world_size}: resume with the same --nproc_per_node"
            )
        want, got = float(sharded["frozen_checksum"]), sharded_frozen_checksum(run.model, self.ctx)
        if abs(want - got) > 1e-9 * max(1.0, abs(want)):
            raise UsageError(
                "the frozen base model differs from the one the checkpoint was trained on "
                f"(checksum {got!r} vs {want!r}): resume with the same --model and --seed"
            )
        last = S.find_train_state(directory).parent
        opts = StateDictOptions(ignore_frozen_params=True)
        msd, osd = get_state_dict(run.model, run.optimizer, options=opts)
        sd: dict[str, Any] = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(last / DCP_DIR))
        # dcp.load filled exactly the trainable keys get_state_dict listed (a key missing from
        # the checkpoint is an error there); strict=False only lets the frozen ones be absent
        set_state_dict(
            run.model,
            run.optimizer,
            model_state_dict=sd["model"],
            optim_state_dict=sd["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
        run.scheduler.load_state_dict(st["scheduler"])
        mine = S.read_rank_state(last / RANK_FILE.format(self.ctx.rank))
        if run.strides is not None and mine.get("strides") is not None:
            run.strides.load_state_dict(mine["strides"])
        S.set_rng_state(mine["rng"])
