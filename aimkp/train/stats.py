"""Per-epoch training totals: one typed record instead of positional counters.

>>> stats = EpochStats()
>>> stats.add(step_result)                 # after every micro-step
>>> stats = stats.all_reduce(ctx)          # totals over the ranks (no-op on one process)
>>> row = stats.as_row(epoch=1, step=40, lr=1e-4, seconds=12.5, n_samples=320)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aimkp.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from aimkp.method.step import StepResult
    from aimkp.train.distributed import DistContext


@dataclass
class EpochStats:
    """Totals of one epoch's micro-steps (on one rank until :meth:`all_reduce`).

    Attributes:
        loss_sum: sum of each micro-step's mean answer CE times its answer tokens.
        answer_tokens: answer tokens of the originals.
        input_tokens: tokens fed to the model (kept tokens of every row).
        text_copies / text_kept: text-masked copies made / kept by the filter.
        image_copies / image_kept: image-masked copies made / kept by the filter.
        grand_pruned: samples pruned by the GraNd-style norm filter.
        nonfinite_rows: rows left out of the gradient for a non-finite loss or gradient.
        nonfinite_skipped_steps: optimizer steps skipped for a non-finite (or empty) gradient.
    """

    loss_sum: float = 0.0
    answer_tokens: float = 0.0
    input_tokens: float = 0.0
    text_copies: int = 0
    text_kept: int = 0
    image_copies: int = 0
    image_kept: int = 0
    grand_pruned: int = 0
    nonfinite_rows: int = 0
    nonfinite_skipped_steps: int = 0

    def add(self, res: StepResult) -> None:
        """Count one micro-step (AimKP steps also count their filter decisions)."""
        d = res.decision
        if d is not None:
            self.text_copies += d.num_text_copies
            self.text_kept += d.text_kept
            self.image_copies += d.num_image_copies
            self.image_kept += d.image_kept
            self.grand_pruned += int(d.pruned.sum())
        self.loss_sum += res.loss * res.n_answer_tokens
        self.answer_tokens += res.n_answer_tokens
        self.input_tokens += res.n_input_tokens
        self.nonfinite_rows += res.nonfinite_rows

    def all_reduce(self, ctx: DistContext) -> EpochStats:
        """Totals over the ranks, field by field (self when not distributed)."""
        if not ctx.enabled:
            return self

        fields = dataclasses.fields(self)
        sums = all_reduce_sum([getattr(self, f.name) for f in fields], ctx)
        values: dict[str, Any] = {
            f.name: v if f.type == "float" else int(v) for f, v in zip(fields, sums)
        }
        out = EpochStats(**values)
        # a skipped optimizer step is one decision taken by every rank alike, not one per rank
        out.nonfinite_skipped_steps = self.nonfinite_skipped_steps
        return out

    @property
    def train_loss(self) -> float:
        """Answer-token mean cross-entropy of the originals."""
        return self.loss_sum / max(1.0, self.answer_tokens)

    def progress(self, seconds: float) -> dict[str, str]:
        """Short progress-bar fields: loss, input tokens/s, kept text / image copies."""
        return {
            "loss": f"{self.train_loss:.3f}",
            "tok_s": f"{self.input_tokens / max(seconds, 1e-9):.0f}",
            "kept_t": f"{self.text_kept}/{self.text_copies}",
            "kept_v": f"{self.image_kept}/{self.image_copies}",
            "non-finite": f"{self.nonfinite_rows}r/{self.nonfinite_skipped_steps}s",
        }

    def as_row(
        self, *, epoch: int, step: int, lr: float, seconds: float, n_samples: int
    ) -> dict[str, Any]:
        """The epoch's row of ``metrics.csv`` (rates NaN when no copy of that kind was made)."""
        return {
            "epoch": epoch,
            "step": step,
            "train_loss": self.train_loss,
            "lr": lr,
            "epoch_s": seconds,
            "samples_per_s": n_samples / seconds,
            "tokens_per_s": self.input_tokens / seconds,
            "text_copies": self.text_copies,
            "text_kept_rate": _rate(self.text_kept, self.text_copies),
            "image_copies": self.image_copies,
            "image_kept_rate": _rate(self.image_kept, self.image_copies),
            "grand_pruned": self.grand_pruned,
            "nonfinite_rows": self.nonfinite_rows,
            "nonfinite_skipped_steps": self.nonfinite_skipped_steps,
        }


def _rate(kept: int, made: int) -> float:
    return kept / made if made else float("nan")
