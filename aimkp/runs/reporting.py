"""Where scalars go besides the CSV files: ``--report-to tensorboard|wandb|none|auto`` (the
choices: :data:`aimkp.choices.REPORT_TO`).

``auto`` (the default, what ``aimkp train`` always did): TensorBoard under ``OUTPUT/tb`` when
it is installed, nothing otherwise. ``tensorboard`` / ``wandb`` asked for but not installed are
a one-line user error (:func:`check_report_to`, run before anything loads). Both are imported
only here, when used (optional extras ``aimkp[tensorboard]`` / ``aimkp[wandb]``).
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

from aimkp.deps import require

_NEEDS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_report_to(kind: str) -> None:
    """UsageError when ``kind`` needs a package that is not installed."""
    need = _NEEDS.get(kind)
    if need is not None:
        require(need, "--report-to none", purpose=f"--report-to {kind}")


class Reporter:
    """No-op reporter (``none``, or ``auto`` without TensorBoard); the base of the others."""

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Record ``scalars`` at ``step`` (an optimizer step, or an epoch for epoch rows)."""

    def close(self) -> None:
        pass


class TensorBoardReporter(Reporter):
    def __init__(self, out: pathlib.Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tb"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    def __init__(self, out: pathlib.Path, config: dict[str, Any] | None) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="aimkp", dir=str(out), config=config or {})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def make_reporter(kind: str, out: pathlib.Path, config: dict[str, Any] | None = None) -> Reporter:
    """The reporter of ``--report-to kind`` writing under the run directory ``out``."""
    check_report_to(kind)
    if kind == "tensorboard" or (kind == "auto" and _installed("tensorboard")):
        return TensorBoardReporter(out)
    if kind == "wandb":
        return WandbReporter(out, config)
    return Reporter()


def numeric(row: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The finite-or-NaN numbers of a metrics row (bools and strings left out)."""
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip
    }
