"""Gradient-based Filtering (GF): keep decisions and per-row loss weights of one AimKP step.

Rows of a step are copies of the batch's samples (see :mod:`aimkp.method.pmm`); row r belongs to
sample i = ``row_sample[r]`` which has K_i rows and n_i answer tokens; N is the number of answer
tokens of the whole (accumulated, global) batch. The loss behind each row is ``loss_sum_r``, the
SUM of the answer-token cross-entropies of that row.

- Provisional weights (every copy kept), mean reduce: ``w0_r = 1 / (K_i N)``: the sample gradient
  is the mean over its copies of the mean-CE gradients, times n_i, over N.
  Sum reduce (the paper's ``L + l_V L_V + l_T L_T``): ``w0_r = 1 / N``.
- Decision: a masked copy whose gradient cosine with its original is below its threshold
  (tau_text for text copies, tau_image for image copies) is rejected; the original never is.
- Final weights: rejected rows 0; kept rows ``1 / (K_i_kept N)`` (mean) or ``1 / N`` (sum).
- Optional GraNd-style pruning: the per-sample norm of the ORIGINAL row's mean-CE gradient is
  compared within the batch by a robust z-score ``(x - median) / (1.4826 MAD)``; samples above the
  threshold get weight 0 on every row.

``row_scale = w / w0`` is what ``gram.reweight`` takes to turn the provisional backward into the
exact gradient of the kept set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aimkp.method.pmm import IMAGE, TEXT, Copy


@dataclass
class GFDecision:
    """Outcome of the filter for one step (R rows, B samples, P = R - B pairs)."""

    kept: torch.Tensor  # BoolTensor [R]
    weights: torch.Tensor  # float64 [R], final weight on loss_sum_r
    provisional: torch.Tensor  # float64 [R], w0
    row_scale: torch.Tensor  # float64 [R], weights / provisional
    text_passed: list[bool | None]  # [B] None when the sample had no text copy
    image_passed: list[bool | None]  # [B]
    pruned: torch.Tensor  # BoolTensor [B] (GraNd)
    cosines: torch.Tensor  # float32 [P]

    @property
    def num_text_copies(self) -> int:
        return sum(p is not None for p in self.text_passed)

    @property
    def num_image_copies(self) -> int:
        return sum(p is not None for p in self.image_passed)

    @property
    def text_kept(self) -> int:
        return sum(bool(p) for p in self.text_passed)

    @property
    def image_kept(self) -> int:
        return sum(bool(p) for p in self.image_passed)


def pairs_of(rows: Sequence[Copy]) -> torch.Tensor:
    """LongTensor [P, 2] of (original row, copy row) for every masked copy, in row order."""
    orig: dict[int, int] = {}
    pairs: list[tuple[int, int]] = []
    for r, c in enumerate(rows):
        if c.kind is None:
            orig[c.sample] = r
    for r, c in enumerate(rows):
        if c.kind is not None:
            if c.sample not in orig:
                raise ValueError(
                    f"row {r} is a copy of sample {c.sample} whose original is missing"
                )
            pairs.append((orig[c.sample], r))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def provisional_weights(rows: Sequence[Copy], n_total: float, reduce: str = "mean") -> torch.Tensor:
    """w0 (float64 [R]): each row's weight on its loss_sum when every copy is kept."""
    if n_total <= 0:
        raise ValueError(f"total answer tokens must be > 0, got {n_total}")
    counts: dict[int, int] = {}
    for c in rows:
        counts[c.sample] = counts.get(c.sample, 0) + 1
    if reduce == "mean":
        w = [1.0 / (counts[c.sample] * n_total) for c in rows]
    elif reduce == "sum":
        w = [1.0 / n_total for _ in rows]
    else:
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    return torch.tensor(w, dtype=torch.float64)


def robust_z(x: torch.Tensor) -> torch.Tensor:
    """Robust z-score (x - median) / (1.4826 MAD); zeros when MAD is 0 or fewer than 3 values."""
    x = x.double()
    if x.numel() < 3:
        return torch.zeros_like(x)
    med = x.median()
    mad = (x - med).abs().median() * 1.4826
    if float(mad) == 0.0:
        return torch.zeros_like(x)
    return (x - med) / mad


def decide(
    rows: Sequence[Copy],
    cosines: torch.Tensor,
    n_total: float,
    *,
    tau_text: float = 0.1,
    tau_image: float = 0.4,
    reduce: str = "mean",
    grand_threshold: float | None = None,
    orig_norms: torch.Tensor | None = None,
    pairs: torch.Tensor | None = None,
    provisional: torch.Tensor | None = None,
) -> GFDecision:
    """Filter decisions and row weights from the pair cosines (ordered as :func:`pairs_of`).

    ``orig_norms`` ([B], gradient norm of each sample's original mean-CE loss) is needed only with
    ``grand_threshold``. ``pairs`` (``pairs_of(rows)``) and ``provisional``
    (``provisional_weights(rows, n_total, reduce)``) may be passed when the caller already has
    them (the AimKP step does); they are computed from ``rows`` otherwise.
    """
    if pairs is None:
        pairs = pairs_of(rows)
    cosines = cosines.detach().float().cpu().reshape(-1)
    if cosines.numel() != pairs.shape[0]:
        raise ValueError(f"{pairs.shape[0]} copy pairs but {cosines.numel()} cosines")
    R = len(rows)
    B = 1 + max((c.sample for c in rows), default=-1)
    kept = torch.ones(R, dtype=torch.bool)
    text_passed: list[bool | None] = [None] * B
    image_passed: list[bool | None] = [None] * B
    for p, (_, r) in enumerate(pairs.tolist()):
        c = rows[r]
        s = float(cosines[p])
        if c.kind == TEXT:
            ok = s >= tau_text
            text_passed[c.sample] = ok
        elif c.kind == IMAGE:
            ok = s >= tau_image
            image_passed[c.sample] = ok
        else:
            raise ValueError(f"unknown copy kind {c.kind!r} in row {r}")
        kept[r] = ok  # NaN cosines compare False: the copy is rejected
    pruned = torch.zeros(B, dtype=torch.bool)
    if grand_threshold is not None:
        if orig_norms is None or orig_norms.numel() != B:
            raise ValueError("GraNd pruning needs the [B] gradient norms of the originals")
        pruned = robust_z(orig_norms.detach().cpu()) > grand_threshold
    w0 = provisional_weights(rows, n_total, reduce) if provisional is None else provisional
    kept_count = [0] * B
    for r, c in enumerate(rows):
        kept_count[c.sample] += int(kept[r])
    w = torch.zeros(R, dtype=torch.float64)
    for r, c in enumerate(rows):
        if kept[r] and not pruned[c.sample]:
            w[r] = 1.0 / n_total if reduce == "sum" else 1.0 / (kept_count[c.sample] * n_total)
    return GFDecision(
        kept=kept,
        weights=w,
        provisional=w0,
        row_scale=w / w0,
        text_passed=text_passed,
        image_passed=image_passed,
        pruned=pruned,
        cosines=cosines,
    )
