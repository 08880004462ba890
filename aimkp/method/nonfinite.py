"""Non-finite values never reach the weights: the optimizer-step guard and the save guard.

The micro-steps already leave non-finite rows out of ``.grad`` (:mod:`aimkp.method.step`). What
is left here: an optimizer step whose summed gradient is still non-finite (or that kept no row
at all) is skipped (no AdamW step, gradients cleared); ``max_skipped_steps`` skipped steps in a
row stop the run with :class:`~aimkp.errors.NonFiniteError` (exit 3); and no checkpoint is written
with a non-finite trainable weight (:func:`check_finite_weights`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from aimkp.errors import NonFiniteError

log = logging.getLogger("aimkp.train")


def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """True when every ``.grad`` of ``params`` is finite (None counts as finite)."""
    flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


def nonfinite_params(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters holding a non-finite value."""
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all())
    ]


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Refuse (NonFiniteError) to write ``where`` when a trainable weight is non-finite."""
    bad = nonfinite_params(model)
    if bad:
        raise NonFiniteError(
            f"refusing to write {where}: {len(bad)} trainable parameter(s) hold non-finite "
            f"values (first: {bad[0]}); lower --lr / --projector-lr or keep --max-grad-norm"
        )


class SkipGuard:
    """Counts skipped (non-finite) optimizer steps; too many in a row stop the run."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.in_a_row = 0

    def step_ok(self, ok: bool, step: int) -> bool:
        """Record optimizer step ``step`` (True: taken); raises after ``limit`` skips in a row."""
        if ok:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        log.warning(
            "non-finite gradient at optimizer step %d: step skipped (%d in a row)",
            step + 1,
            self.in_a_row,
        )
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"training stopped: {self.in_a_row} optimizer steps in a row had non-finite "
                f"gradients (--max-skipped-steps {self.limit}); lower --lr / --projector-lr or "
                "keep --max-grad-norm"
            )
        return False
