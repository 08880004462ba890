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
from typing import TYPE_CHECKING, Any

from aimkp.atomic import atomic_dir
from aimkp.errors import UsageError

if TYPE_CHECKING:
    from aimkp.models import LoadedModel
    from aimkp.train.run import TrainRun

log = logging.getLogger("aimkp.train")

STEP_PREFIX = "step-"
SPACE_MARGIN = 1.1  # free space wanted: the estimated checkpoint bytes times this


def save_model(
    run: TrainRun, name: str, extra: dict[str, Any], loaded: LoadedModel | None = None
) -> None:
    """``OUTPUT/<name>``: the model (LoRA: a peft adapter naming one copy of a preset's initial
    base per run, ``OUTPUT/base``). Refused when a trainable weight is non-finite. ``loaded``:
    the model to write when it is not ``run.loaded`` (``--fsdp``: rank 0's consolidated copy)."""
    with atomic_dir(run.out / name) as tmp:
        write_model_files(run, tmp, extra, loaded or run.loaded, name=name)


def write_model_files(
    run: TrainRun,
    directory: pathlib.Path,
    extra: dict[str, Any],
    loaded: LoadedModel,
    *,
    name: str,
) -> None:
    """The model files of ``loaded`` into ``directory`` (refused, naming ``OUTPUT/<name>``, when a
    trainable weight is non-finite)."""
    from aimkp.method.nonfinite import check_finite_weights
    from aimkp.models.checkpoint import save_checkpoint

    check_finite_weights(loaded.model, str(run.out / name))
    save_checkpoint(directory, loaded, extra_json=extra, base_dir=run.out / "base")


def save_last(run: TrainRun, partial: dict[str, Any] | None = None) -> None:
    """``OUTPUT/last``: the model and the full training state at ``run.progress`` (mid-epoch
    when ``progress.epoch_step`` > 0; ``partial``: the epoch's totals so far). With
    ``--keep-last`` also a copy as ``OUTPUT/step-NNNNNN``."""
    p = run.progress
    with atomic_dir(run.out / "last") as tmp:
        extra = {"epoch": p.epoch, "epoch_step": p.epoch_step, "step": p.step}
        write_model_files(run, tmp, extra, run.loaded, name="last")
        _write_state(run, tmp, partial)
    if run.cfg.keep_last:
        save_step_copy(run.out, p.step, run.cfg.keep_last)


def _write_state(run: TrainRun, directory: pathlib.Path, partial: dict[str, Any] | None) -> None:
    from aimkp.runs.state import save_train_state

    p = run.progress
    save_train_state(
        directory,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        strides=run.strides,
        epoch=p.epoch,
        step=p.step,
        best_score=p.best_score,
        best_epoch=p.best_epoch,
        history=p.history,
        config=run.cfg.to_dict(),
        epoch_step=p.epoch_step,
        partial=partial,
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


def checkpoint_bytes(run: TrainRun) -> int:
    """Estimated bytes of one ``last`` checkpoint: the trainable weights in the model files and
    in the training state, AdamW's two moments, and the frozen base when ``OUTPUT/base`` is not
    written yet (LoRA on a preset)."""
    trainable = sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
    frozen = sum(
        p.numel() * p.element_size() for p in run.model.parameters() if not p.requires_grad
    )
    base = frozen if run.cfg.full_finetune is False and not (run.out / "base").is_dir() else 0
    return 4 * trainable + base


def check_free_space(run: TrainRun) -> None:
    """UsageError (before the first step) when the disk under OUTPUT cannot hold one more
    checkpoint (:func:`checkpoint_bytes` times :data:`SPACE_MARGIN`)."""
    need = int(checkpoint_bytes(run) * SPACE_MARGIN)
    free = shutil.disk_usage(run.out).free
    if free < need:
        raise UsageError(
            f"--output {run.out}: not enough free space for a checkpoint: about "
            f"{need / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free"
        )
