"""What ``--resume`` may change: every option is compared with the saved run's config before
anything loads, and each difference is named (all of them, on one line).

Safe to change with ``--allow-changed NAME,...`` (:data:`SAFE_TO_CHANGE`): learning rates, the
number of epochs, evaluation, saving and logging options, threads and device; the accepted
changes are recorded (``Progress.resumed``, the ``resumed`` column of ``metrics.csv``). Anything
else (data, model, batch size, accumulation, seed, method, LoRA, ...) defines the run and stays
refused. Per-invocation options (:data:`NOT_COMPARED`) are never compared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from aimkp.errors import UsageError

NOT_COMPARED = frozenset({"resume", "allow_changed", "stop_after_epochs", "output"})
SAFE_TO_CHANGE = frozenset(
    {
        "lr",
        "projector_lr",
        "epochs",
        "eval_max_samples",
        "eval_every_epoch",
        "max_new_tokens",
        "baselines",
        "save_every",
        "keep_last",
        "max_skipped_steps",
        "num_threads",
        "device",
        "dist_timeout",
    }
)


class RunConfig(Protocol):
    """A run's config dataclass (``aimkp train``'s :class:`aimkp.train.TrainConfig`): its fields
    are the options compared."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    @property
    def resume(self) -> str | None: ...

    @property
    def allow_changed(self) -> Sequence[str]: ...


def changed_options(saved: dict[str, Any], cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(name, saved value, given value)`` of every compared option that differs (an option
    the saved config lacks compares with its default)."""
    out = []
    for f in dataclasses.fields(cfg):
        if f.name in NOT_COMPARED:
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        was, now = saved.get(f.name, default), getattr(cfg, f.name)
        if _norm(was) != _norm(now):
            out.append((f.name, was, now))
    return out


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def check_resume_options(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """UsageError naming every refused change; returns the accepted ones as
    ``"name: saved -> given"``."""
    changes = changed_options(saved, cfg)
    allowed = set(cfg.allow_changed)
    unknown = sorted(allowed - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise UsageError(f"--allow-changed: unknown option(s) {', '.join(unknown)}")
    refused = [c for c in changes if c[0] not in allowed or c[0] not in SAFE_TO_CHANGE]
    if refused:
        listed = "; ".join(f"{n}: saved {w!r}, given {g!r}" for n, w, g in refused)
        unsafe = sorted(n for n, _, _ in refused if n not in SAFE_TO_CHANGE)
        safe = sorted(n for n, _, _ in refused if n in SAFE_TO_CHANGE)
        hint = (f" pass --allow-changed {','.join(safe)} to accept" if safe else "") + (
            f"; {', '.join(unsafe)} cannot change in a resumed run" if unsafe else ""
        )
        raise UsageError(
            f"--resume {cfg.resume}: options differ from the saved run: {listed};{hint}"
        )
    return [f"{n}: {w!r} -> {g!r}" for n, w, g in changes]


def resumed_fields(
    given: dict[str, Any], flags: set[str], saved: dict[str, Any], resume: str
) -> dict[str, Any]:
    """The config fields of ``aimkp train --resume DIR ...``: ``given`` (every field, as
    ``TrainConfig.to_dict()`` gives them) with the saved config's value for every field whose
    flag is not in ``flags`` (the ones given on the command line), and the output defaulting to
    ``DIR``."""
    out = dict(given)
    for k, v in saved.items():
        if k in given and k not in flags and k not in NOT_COMPARED:
            out[k] = v
    if "output" not in flags:
        out["output"] = resume
    return out
