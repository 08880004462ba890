"""Checkpoint and resume of the training state, exact to the bit on the same machine.

``OUTPUT/last/train_state.pt`` holds: the trainable parameters (the frozen ones are rebuilt by the
run's own model spec and seed, and checked against a stored checksum), the optimizer and scheduler
states, the PMM stride tables, the RNG states (python, numpy, torch CPU and CUDA), the epoch and
optimizer step reached, the best validation score and the metrics history.
"""

from __future__ import annotations

import contextlib
import pathlib
import pickle
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aimkp.atomic import recover
from aimkp.errors import CheckpointError, UsageError
from aimkp.method.pmm import StrideTable

STATE_FILE = "train_state.pt"


@dataclass
class Progress:
    """Where the run stands; saved with every ``last`` checkpoint and restored on resume."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (skipped non-finite ones included)
    skipped_steps: int = 0  # non-finite optimizer steps skipped by this process (per-step logs)
    epoch_step: int = 0  # optimizer steps done in epoch ``epoch`` (a mid-epoch checkpoint)
    partial: dict[str, Any] | None = None  # that epoch's totals so far (resumed mid-epoch)
    best_score: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU clones of the trainable parameters, by name."""
    return {
        n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
    }


def _saved_name(name: str, state: dict[str, torch.Tensor]) -> str:
    """``name`` as a state saved before the projector became peft's ``modules_to_save`` knows it
    (``...projector.modules_to_save.default.linear_1.weight`` was ``...projector.linear_1...``)."""
    if name in state:
        return name
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters into ``model`` (names and shapes must match)."""
    params = {_saved_name(n, state): p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise UsageError(
            f"trainable parameters differ from the checkpoint: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise UsageError(
                    f"parameter {n}: shape {tuple(p.shape)} vs {tuple(state[n].shape)}"
                )
            p.copy_(state[n].to(p.device, p.dtype))


def frozen_checksum(model: torch.nn.Module) -> float:
    """A float64 checksum of the frozen parameters (position-weighted sums), to detect a resume
    onto a different base model."""
    total = 0.0
    # peft's frozen copy of the projector (``original_module``) is left out, so the sum is the
    # one of runs from before the projector became peft's ``modules_to_save``
    named = [(n, p) for n, p in model.named_parameters() if ".original_module." not in n]
    with torch.no_grad():
        for k, (_, p) in enumerate(named):
            if not p.requires_grad:
                total += (k + 1) * float(p.detach().double().sum()) + float(
                    p.detach().double().abs().sum()
                )
    return total


def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_train_state(
    directory: str | pathlib.Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    strides: StrideTable | None,
    epoch: int,
    step: int,
    best_score: float | None,
    best_epoch: int | None,
    history: list[dict[str, Any]],
    config: dict[str, Any],
    epoch_step: int = 0,
    partial: dict[str, Any] | None = None,
    sharded: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write ``train_state.pt`` under ``directory`` (created); returns its path.

    ``epoch``: epochs completed; ``epoch_step``: optimizer steps done in the next epoch (a
    mid-epoch checkpoint, > 0) with ``partial`` its totals so far (``EpochStats`` fields and
    ``seconds``). ``sharded`` (``--fsdp``): the weights and optimizer state are in a
    ``torch.distributed.checkpoint`` beside this file, which records ``sharded`` (its format,
    world size and the frozen checksum) instead."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        "format": 1,
        "trainable": trainable_state(model) if sharded is None else {},
        "frozen_checksum": frozen_checksum(model)
        if sharded is None
        else sharded["frozen_checksum"],
        "optimizer": optimizer.state_dict() if sharded is None else {},
        "sharded": sharded,
        "scheduler": scheduler.state_dict(),
        "strides": None if strides is None else strides.state_dict(),
        "rng": rng_state(),
        "epoch": epoch,
        "step": step,
        "best_score": best_score,
        "best_epoch": best_epoch,
        "history": history,
        "config": config,
        "epoch_step": epoch_step,
        "partial": partial,
    }
    path = d / STATE_FILE
    tmp = d / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def find_train_state(directory: str | pathlib.Path) -> pathlib.Path:
    """``train_state.pt`` of a run's ``last`` directory (or of the directory itself). A
    ``last`` left renamed aside by a crash in the middle of its swap is put back first."""
    d = pathlib.Path(directory)
    recover(d / "last")
    for cand in (d / STATE_FILE, d / "last" / STATE_FILE):
        if cand.is_file():
            return cand
    raise CheckpointError(f"no {STATE_FILE} under {d} or {d / 'last'}: nothing to resume from")


def read_train_state(directory: str | pathlib.Path) -> dict[str, Any]:
    """Read ``train_state.pt`` from a run's ``last`` directory (or the run directory itself).

    Nothing in the file can run code: it is unpickled with ``weights_only=True``, which builds
    tensors, numbers, strings and containers only, plus exactly the numpy types of the numpy RNG
    state (:func:`_numpy_rng_types`). A file holding anything else is refused
    (:class:`~aimkp.errors.CheckpointError`), whoever wrote it.
    """
    path = find_train_state(directory)
    try:
        with _allowed_globals(_numpy_rng_types()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"objects ({named.group(1)})" if named else "something (corrupt, or objects)"
        raise CheckpointError(
            f"{path}: refused: it holds {what} other than tensors, numbers, strings and "
            "containers; aimkp never writes those, and they could run code on load"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:  # not a torch file, truncated, unreadable
        raise CheckpointError(f"{path}: cannot read the training state ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise CheckpointError(f"{path}: not a training state written by aimkp (format 1)")
    return state


def read_rank_state(path: pathlib.Path) -> dict[str, Any]:
    """One rank's RNG states and stride tables of a sharded checkpoint (``--fsdp``), read as
    safely as :func:`read_train_state`."""
    try:
        with _allowed_globals(_numpy_rng_types()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read this rank's training state ({exc})") from None


def _numpy_rng_types() -> list[Any]:
    """What ``np.random.get_state()`` pickles as: its uint32 key array. Found from numpy itself
    (``numpy.core`` on numpy 1, ``numpy._core`` on numpy 2)."""
    reconstruct = np.ndarray((0,), dtype=np.uint32).__reduce__()[0]
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@contextlib.contextmanager
def _allowed_globals(types: list[Any]) -> Iterator[None]:
    """``torch.serialization.safe_globals`` (torch >= 2.5); the process-wide ``add_safe_globals``
    on older torch."""
    ser = torch.serialization
    if hasattr(ser, "safe_globals"):
        with ser.safe_globals(types):
            yield
    else:
        ser.add_safe_globals(types)
        yield


def restore_train_state(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    strides: StrideTable | None,
    check_frozen: bool = True,
) -> None:
    """Load model (trainable part), optimizer, scheduler, strides and RNG states."""
    if check_frozen:
        want, got = float(state["frozen_checksum"]), frozen_checksum(model)
        if abs(want - got) > 1e-9 * max(1.0, abs(want)):
            raise UsageError(
                "the frozen base model differs from the one the checkpoint was trained on "
                f"(checksum {got!r} vs {want!r}): resume with the same --model and --seed"
            )
    load_trainable_state(model, state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if strides is not None and state.get("strides") is not None:
        strides.load_state_dict(state["strides"])
    set_rng_state(state["rng"])
