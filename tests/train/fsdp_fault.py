"""``aimkp`` with a fault injected after an optimizer step, for tests/train/test_train_fsdp.py.

``AIMKP_TEST_FAULT=KIND:STEP``: after optimizer step STEP (and its checkpoint, if any) ``kill``
makes every rank send SIGKILL to torchrun and to itself (``kill -9`` of the whole group),
``exit`` ends rank 1 with status 1, ``hang`` makes rank 1 sleep; ``nan`` makes rank 1's row
losses NaN in the first forward of optimizer step STEP. Run as torchrun's
script: ``torchrun ... tests/train/fsdp_fault.py train ...``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

from aimkp.cli import main
from aimkp.models import RowLosses
from aimkp.spans import tapping
from aimkp.train import epoch

KIND, STEP = os.environ["AIMKP_TEST_FAULT"].split(":")
RANK = int(os.environ.get("RANK", "0"))
_after_step = epoch.after_step


def after_step(run, stats, seconds, stop) -> None:  # noqa: ANN001
    _after_step(run, stats, seconds, stop)
    if run.progress.step != int(STEP):
        return
    if KIND == "kill":  # every rank: torchrun first, then itself
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    elif KIND == "exit" and RANK == 1:
        os._exit(1)
    elif KIND == "hang" and RANK == 1:
        # torchrun's SIGTERM ends the sleeper at once (the run's own handler would defer it to
        # the next step, and torchrun would SIGKILL it 30 s later: slower, same outcome)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(600)


def poison(losses: RowLosses) -> RowLosses:
    """The ``row_losses`` tap (:mod:`aimkp.spans`): NaN losses on rank 1, once, in step STEP."""
    step = _steps_done[0] + 1
    if KIND == "nan" and RANK == 1 and step == int(STEP) and step not in _poisoned:
        _poisoned.append(step)
        losses = dataclasses.replace(losses, loss_sum=losses.loss_sum * float("nan"))
    return losses


def optimizer_step(run, used_rows):  # noqa: ANN001, ANN201
    ok = _optimizer_step(run, used_rows)
    _steps_done[0] = run.progress.step
    return ok


_steps_done = [0]
_poisoned: list[int] = []
_optimizer_step = epoch.optimizer_step
epoch.after_step = after_step
epoch.optimizer_step = optimizer_step

if __name__ == "__main__":
    with tapping("row_losses", poison):
        sys.exit(main())
