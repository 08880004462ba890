"""Data-parallel training across processes (``torchrun --nproc_per_node N -m aimkp train ...``).

Every rank holds the whole model and the whole (encoded) training set. A step takes the same
global batch on every rank (same seed, same permutation); rank ``r`` trains on samples
``r, r + W, r + 2W, ...`` of it. The step's loss is divided by the answer tokens of the GLOBAL
batch (every rank can count them: it has every sample), so summing the ranks' gradients
(``all_reduce_grads``) gives exactly the single-process gradient of the global batch, Gradient-based
Filtering included (its decisions are per sample). Each sample is visited by one rank per epoch;
the stride tables are reconciled at the end of the epoch (``StrideTable.reconcile``). Rank 0
evaluates, logs and writes checkpoints; the others wait at a barrier.

The gradients are reduced by hand after the micro-steps rather than by a DDP wrapper: the
per-sample gradient engine hooks the model's own modules and re-weights ``.grad`` after each
backward, which must happen before the ranks' gradients are summed.

The loop reaches the parallel scheme only through a strategy object (``TrainRun.parallel``):
:class:`DataParallel` here (every rank holds the whole model),
:class:`aimkp.train.fsdp.FSDPParallel` with ``--fsdp`` (weights, gradients and optimizer
state sharded); see docs/distributed.md.
A rank that dies or hangs stops the others after ``--dist-timeout`` seconds in their next
collective (torchrun then ends the whole group with a non-zero status).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from aimkp.method.nonfinite import grads_finite
from aimkp.runs.checkpoints import save_last
from aimkp.runs.state import restore_train_state

if TYPE_CHECKING:
    from aimkp.models import LoadedModel
    from aimkp.train.config import TrainConfig
    from aimkp.train.run import TrainRun

log = logging.getLogger("aimkp.train")

#: exit status of a rank that lost its peers (one died, or did not answer within --dist-timeout)
PEER_LOST_EXIT = 4

__all__ = [
    "PEER_LOST_EXIT",
    "DataParallel",
    "DistContext",
    "all_reduce_grads",
    "all_reduce_sum",
    "broadcast_trainable",
    "init_distributed",
    "peer_loss_exits",
    "rank_device",
    "rank_share",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (all-reduced: the same answer on every rank)."""
        if not self.enabled:
            return flag
        (ranks,) = all_reduce_sum([1.0 if flag else 0.0], self)
        return bool(ranks)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def init_distributed(
    device: torch.device, timeout_s: float = 1800.0, single_group: bool = False
) -> DistContext:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a single process otherwise (with
    ``single_group``: in a process group of its own, which FSDP2 needs even on one rank).

    NCCL for CUDA devices (each rank on ``cuda:LOCAL_RANK``), gloo on CPU. ``timeout_s``: how
    long a collective waits for the other ranks before it fails (a rank died or hangs)."""
    world = _env_int("WORLD_SIZE", 1)
    timeout = datetime.timedelta(seconds=timeout_s)
    if world <= 1:
        if single_group and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(  # an in-memory store: nobody else joins
                backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                timeout=timeout,
            )  # fmt: skip
            return DistContext(backend=backend)
        return DistContext()
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} outside [0, WORLD_SIZE={world})")
    dist = torch.distributed
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                      backend=dist.get_backend())  # fmt: skip
    log.info("distributed: rank %d of %d (%s)", ctx.rank, ctx.world_size, ctx.backend)
    return ctx


# what gloo / NCCL / the store say when a peer is gone or silent (their errors share no type)
_PEER_LOST = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
              "NCCL communicator was aborted", "Broken pipe")  # fmt: skip


@contextlib.contextmanager
def peer_loss_exits(timeout_s: float) -> Iterator[None]:
    """Turn a collective that failed because another rank died or hangs into one line on stderr
    and exit status :data:`PEER_LOST_EXIT` (torchrun then stops the remaining ranks), instead of a
    traceback per rank. Outside a process group nothing changes."""
    try:
        yield
    except (RuntimeError, ConnectionError) as exc:
        dist = torch.distributed
        msg = str(exc)
        if not (dist.is_available() and dist.is_initialized()) or not any(
            s in msg for s in _PEER_LOST
        ):
            raise
        rank = dist.get_rank()
        first = " ".join(msg.split())[:200]
        print(
            f"aimkp train: error: rank {rank}: another rank died or did not answer within "
            f"--dist-timeout {timeout_s:g} s ({first}); resume from the last checkpoint with "
            "aimkp train --resume OUTPUT",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(PEER_LOST_EXIT) from None


def rank_device(ctx: DistContext, device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for CUDA runs under torchrun, else ``device``."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def rank_share(indices: Sequence[int], ctx: DistContext) -> list[int]:
    """This rank's part of a global batch: every ``world_size``-th index from ``rank``."""
    return list(indices[ctx.rank :: ctx.world_size])


def _comm_device(ctx: DistContext, t: torch.Tensor) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else t.device


def all_reduce_grads(params: Iterable[torch.nn.Parameter], ctx: DistContext) -> None:
    """Sum ``.grad`` of ``params`` over the ranks, in place (one flat buffer per dtype).

    A parameter without a gradient on some rank contributes zeros (every rank takes part in
    every reduction, so no rank waits for a tensor another one skips)."""
    if not ctx.enabled:
        return
    ps = [p for p in params if p.requires_grad]
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in ps:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype in sorted(by_dtype, key=str):
        group = by_dtype[dtype]
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
        )
        dev = flat.device
        flat = flat.to(_comm_device(ctx, flat))
        torch.distributed.all_reduce(flat)
        flat = flat.to(dev)
        off = 0
        for p in group:
            n = p.numel()
            g = flat[off : off + n].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += n


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Sum Python numbers over the ranks (for logged totals)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dev = t.device
    t = t.to(_comm_device(ctx, t))
    torch.distributed.all_reduce(t)
    return t.to(dev).tolist()


def broadcast_trainable(model: torch.nn.Module, ctx: DistContext) -> None:
    """Make every rank start from rank 0's trainable weights."""
    if not ctx.enabled:
        return
    for p in model.parameters():
        if p.requires_grad:
            buf = p.data.to(_comm_device(ctx, p.data))
            torch.distributed.broadcast(buf, 0)
            p.data.copy_(buf.to(p.device))


class DataParallel:
    """The parallel strategy the loop calls (``TrainRun.parallel``): every rank holds the whole
    model; gradients summed by hand after the micro-steps (:func:`all_reduce_grads`), rank 0
    writes checkpoints. :class:`aimkp.train.fsdp.FSDPParallel` overrides each hook."""

    name = "ddp"

    def __init__(self, cfg: TrainConfig, ctx: DistContext, device: torch.device) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, device

    def wrap(self, loaded: LoadedModel) -> None:
        """Before the optimizer is built: every rank starts from rank 0's trainable weights."""
        broadcast_trainable(loaded.model, self.ctx)

    def micro_batches(
        self, idx: Sequence[int], global_size: int, batch_size: int
    ) -> Iterator[tuple[list[int], bool]]:
        """This rank's micro-batches of its share ``idx`` and whether each is the last one."""
        starts = range(0, len(idx), batch_size)
        for m in starts:
            yield list(idx[m : m + batch_size]), m == starts[-1]

    @contextlib.contextmanager
    def micro_step(self, run: TrainRun, last: bool, pad_sample: int) -> Iterator[None]:
        """Around one micro-step (nothing to do: the gradients are summed after the last)."""
        yield

    def reduce_grads(
        self, params: Sequence[torch.nn.Parameter], used_rows: int
    ) -> tuple[bool, float]:
        """Sum ``.grad`` over the ranks; (every gradient finite, rows used over the ranks)."""
        all_reduce_grads(params, self.ctx)
        (used_total,) = all_reduce_sum([used_rows], self.ctx)
        return grads_finite(params), used_total

    def clip(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    @contextlib.contextmanager
    def consolidated(self, run: TrainRun, on_device: bool = False) -> Iterator[LoadedModel | None]:
        """The model to validate (``on_device``) and save: rank 0's, None on the others."""
        yield run.loaded if self.ctx.is_main else None

    def save_last(
        self, run: TrainRun, view: LoadedModel | None, partial: dict[str, Any] | None = None
    ) -> None:
        """``OUTPUT/last`` (rank 0 writes; the caller's barrier makes the others wait)."""
        if self.ctx.is_main:
            save_last(run, partial)

    def restore(self, run: TrainRun, st: dict[str, Any], directory: str) -> None:
        restore_train_state(st, **run.stateful())
