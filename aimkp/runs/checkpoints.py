"""The run's checkpoint directories, each written whole (:func:`aimkp.atomic.atomic_dir`):
``OUTPUT/best`` (the model), ``OUTPUT/last`` (the model and the full training state, at the end
of an epoch or mid-epoch with ``--save-every`` / on SIGINT / SIGTERM), optional step checkpoints
``OUTPUT/step-NNNNNN`` (``--keep-last K``: the K newest kept) and, before the first step, a check
that the disk holds one more checkpoint. With ``--fsdp`` the training state of ``OUTPUT/last`` is
sharded (``torch.distributed.checkpoint``) and the model files come from a consolidated copy:
:meth:`aimkp.train.fsdp.FSDPParallel.save_last`.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
from typing import TYPE_CHECKING, Any, Protocol

from aimkp.atomic import atomic_dir, tree_bytes
from aimkp.errors import UsageError
from aimkp.method.nonfinite import check_finite_weights
from aimkp.models.checkpoint import save_checkpoint
from aimkp.runs.state import Progress, save_train_state

if TYPE_CHECKING:
    from torch import nn

    from aimkp.models import LoadedModel

log = logging.getLogger("aimkp.train")


class RunSettings(Protocol):
    """The options a checkpoint reads (the training loop's ``TrainConfig``)."""

    @property
    def full_finetune(self) -> bool: ...
    @property
    def keep_last(self) -> int | None: ...
    def to_dict(self) -> dict[str, Any]: ...


class CheckpointedRun(Protocol):
    """What the checkpoints read of a run (the training loop's ``TrainRun``): the run package
    stays below the training package, which it never imports."""

    @property
    def cfg(self) -> RunSettings: ...
    @property
    def out(self) -> pathlib.Path: ...
    @property
    def loaded(self) -> LoadedModel: ...
    @property
    def model(self) -> nn.Module: ...
    @property
    def progress(self) -> Progress: ...
    def stateful(self) -> dict[str, Any]: ...


STEP_PREFIX = "step-"
SPACE_MARGIN = 1.1  # free space wanted: the estimated checkpoint bytes times this


def save_model(
    run: CheckpointedRun, name: str, extra: dict[str, Any], loaded: LoadedModel | None = None
) -> None:
    """``OUTPUT/<name>``: the model (LoRA: a peft adapter naming one copy of a preset's initial
    base per run, ``OUTPUT/base``). Refused when a trainable weight is non-finite. ``loaded``:
    the model to write when it is not ``run.loaded`` (``--fsdp``: rank 0's consolidated copy)."""
    loaded = loaded or run.loaded
    check_finite_weights(loaded.model, str(run.out / name))
    with atomic_dir(run.out / name, need_bytes=model_bytes(run)) as tmp:
        write_model_files(run, tmp, extra, loaded)


def write_model_files(
    run: CheckpointedRun, directory: pathlib.Path, extra: dict[str, Any], loaded: LoadedModel
) -> None:
    """The model files of ``loaded`` into ``directory`` (its weights checked finite before)."""
    save_checkpoint(directory, loaded, extra_json=extra, base_dir=run.out / "base")


def save_last(run: CheckpointedRun, partial: dict[str, Any] | None = None) -> None:
    """``OUTPUT/last``: the model and the full training state at ``run.progress`` (mid-epoch
    when ``progress.epoch_step`` > 0; ``partial``: the epoch's totals so far). With
    ``--keep-last`` also a copy as ``OUTPUT/step-NNNNNN``."""
    p = run.progress
    check_finite_weights(run.model, str(run.out / "last"))
    with atomic_dir(run.out / "last", need_bytes=checkpoint_bytes(run)) as tmp:
        extra = {"epoch": p.epoch, "epoch_step": p.epoch_step, "step": p.step}
        write_model_files(run, tmp, extra, run.loaded)
        write_train_state(run, tmp, partial)
    if run.cfg.keep_last:
        save_step_copy(run.out, p.step, run.cfg.keep_last)


def write_train_state(
    run: CheckpointedRun,
    directory: pathlib.Path,
    partial: dict[str, Any] | None,
    sharded: dict[str, Any] | None = None,
) -> None:
    """``train_state.pt`` of ``run`` at its progress (``sharded``: see ``save_train_state``)."""
    p = run.progress
    save_train_state(
        directory,
        **run.stateful(),
        epoch=p.epoch,
        step=p.step,
        best_score=p.best_score,
        best_epoch=p.best_epoch,
        history=p.history,
        config=run.cfg.to_dict(),
        epoch_step=p.epoch_step,
        partial=partial,
        sharded=sharded,
    )


def save_step_copy(out: pathlib.Path, step: int, keep: int) -> None:
    """``OUTPUT/step-NNNNNN``: a copy of ``OUTPUT/last``; only the ``keep`` newest are kept."""
    with atomic_dir(out / f"{STEP_PREFIX}{step:06d}") as tmp:
        shutil.copytree(out / "last", tmp, dirs_exist_ok=True)
    for old in step_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def step_checkpoints(out: pathlib.Path) -> list[pathlib.Path]:
    """The step checkpoints of a run directory, oldest first."""
    return sorted(d for d in out.glob(f"{STEP_PREFIX}[0-9]*") if d.is_dir())


def _param_bytes(run: CheckpointedRun, trainable: bool) -> int:
    return sum(
        p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad == trainable
    )


def model_bytes(run: CheckpointedRun) -> int:
    """Bytes of one model checkpoint (``best``): every weight with full fine-tuning (the
    frozen vision tower is in ``model.safetensors`` too), the trainable ones with LoRA."""
    full = _param_bytes(run, False) if run.cfg.full_finetune else 0
    return _param_bytes(run, True) + full


def _base_bytes(run: CheckpointedRun) -> int:
    """The LoRA base copy ``OUTPUT/base`` when it is not written yet (a preset's LoRA run)."""
    if run.cfg.full_finetune or (run.out / "base").is_dir():
        return 0
    return _param_bytes(run, False)


def checkpoint_bytes(run: CheckpointedRun) -> int:
    """Estimated bytes of one ``last`` checkpoint: the model checkpoint, the trainable weights
    again in the training state with AdamW's two moments, and the frozen base when
    ``OUTPUT/base`` is not written yet (LoRA on a preset)."""
    return model_bytes(run) + 3 * _param_bytes(run, True) + _base_bytes(run)


def peak_bytes(run: CheckpointedRun) -> int:
    """Bytes the run's checkpoints occupy at their peak: ``best``, two ``last`` (the new one is
    written whole before the old one goes), the ``--keep-last`` step copies plus the one being
    written, and the base copy once."""
    last = checkpoint_bytes(run) - _base_bytes(run)
    steps = (run.cfg.keep_last + 1) * last if run.cfg.keep_last else 0
    return model_bytes(run) + 2 * last + steps + _base_bytes(run)


def _present_bytes(out: pathlib.Path) -> int:
    """Bytes of the checkpoints already in the run directory (a resumed run rewrites them)."""
    dirs = [out / "best", out / "last", *step_checkpoints(out)]
    return sum(tree_bytes(d) for d in dirs)


def check_free_space(run: CheckpointedRun) -> None:
    """UsageError (before the first step) when the disk under OUTPUT cannot hold the run's
    checkpoints at their peak (:func:`peak_bytes`, less what a resumed run already has there,
    times :data:`SPACE_MARGIN`)."""
    need = int(max(0, peak_bytes(run) - _present_bytes(run.out)) * SPACE_MARGIN)
    free = shutil.disk_usage(run.out).free
    if free < need:
        raise UsageError(
            f"--output {run.out}: not enough free space for the run's checkpoints (best/, last/ "
            f"and the new last/ written before the old one goes): about {need / 2**20:.1f} MiB "
            f"needed, {free / 2**20:.1f} MiB free"
        )
