"""One micro-step of training: the AimKP step (PMM copies + one-backward Gradient-based Filtering)
and the plain fine-tuning (SFT) step. Neither calls the optimizer: the loop does, after
``grad_accum`` micro-steps, so accumulation stays exact (every weight divides by the answer-token
count ``n_total`` of the whole accumulated batch, computed before the micro-steps).

AimKP step, for a micro-batch of B encoded samples::

    plan   = plan_rows(...)                   # built once: rows (original, text copy if |g_T| > 1,
                                              # image copy if |g_V| > 1), pairs, w0, keeps, batch
    with per_sample_grad_gram(model, pairs=plan.pairs, module_rows=plan.batch.module_rows,
                              keep_for_reweight=True) as gram:
        forward_backward(plan.batch)          # (w0 * loss_sum).sum(): every copy kept
    decision = gf.decide(rows, gram.cosines, pairs=plan.pairs, provisional=plan.w0)
    gram.reweight(decision.weights / w0)      # exact gradient of the kept set, no 2nd backward
    strides.update(decision)                  # PMM schedule from the same cosines
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from aimkp.models.adapter import EncodedSample
from aimkp.train.gf import GFDecision, decide, pairs_of, provisional_weights
from aimkp.train.pmm import Copy, StrideTable, build_keep

if TYPE_CHECKING:
    from aimkp.models import LoadedModel, RowBatch, RowLosses
    from aimkp.models.forward import ForwardRecord

log = logging.getLogger(__name__)

Device = torch.device | str


@dataclass
class StepResult:
    """What one micro-step did (for logs and tests)."""

    loss: float  # answer-token mean CE over the originals of the micro-batch
    n_samples: int
    n_rows: int
    n_answer_tokens: int  # answer tokens of the originals
    n_input_tokens: int  # tokens fed to the model (all rows, kept tokens only)
    rows: list[Copy] = field(default_factory=list)
    decision: GFDecision | None = None
    engine_backend: str | None = None
    ran: ForwardRecord | None = None  # what the row forward ran


@dataclass
class StepRows:
    """The rows of one micro-step, built once and passed on (R rows, B samples, P pairs).

    Attributes:
        rows: the copies, in row order.
        pairs: LongTensor ``[P, 2]`` (original row, copy row) of every masked copy.
        w0: float64 ``[R]`` provisional loss weights (every copy kept).
        orig_rows: LongTensor ``[B]``: the row of each sample's original.
        keeps: BoolTensor ``[T_i]`` keep mask of each row.
        batch: the collated rows (with the engine's ``module_rows``).
    """

    rows: list[Copy]
    pairs: torch.Tensor
    w0: torch.Tensor
    orig_rows: torch.Tensor
    keeps: list[torch.Tensor]
    batch: RowBatch

    @property
    def n_input_tokens(self) -> int:
        """Tokens fed to the model: the kept tokens of every row."""
        return int(sum(int(k.sum()) for k in self.keeps))


def autocast_ctx(device: Device, bf16: bool | torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast on CUDA when asked (``bf16`` True: bf16; a dtype: that dtype, the frozen base's
    half dtype of ``--dtype``), else a no-op context."""
    device = torch.device(device)
    if bf16 and device.type == "cuda":
        return torch.autocast(
            "cuda", dtype=bf16 if isinstance(bf16, torch.dtype) else torch.bfloat16
        )
    return contextlib.nullcontext()


def build_rows(
    samples: Sequence[EncodedSample], indices: Sequence[int], strides: StrideTable | None
) -> list[Copy]:
    """Rows of a micro-batch: originals only without a stride table, else every PMM copy."""
    if len(samples) != len(indices):
        raise ValueError(f"{len(samples)} samples but {len(indices)} dataset indices")
    rows: list[Copy] = []
    for b, (s, i) in enumerate(zip(samples, indices)):
        rows += [Copy(b, None, 1)] if strides is None else strides.copies(int(i), s, b)
    return rows


def plan_rows(
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    rows: Sequence[Copy],
    n_total: float,
    *,
    reduce: str = "mean",
    mask_mode: str = "compact",
    device: Device = "cpu",
    layout: str = "auto",
) -> StepRows:
    """Build a micro-step's rows once: pairs, provisional weights, keep masks, collated batch.

    One row per copy. The model's row forward runs the frozen vision tower once per distinct
    sample and the trainable projector once per ROW, so the per-row gradient engine sees each
    copy's own projector activations (as if every copy had gone through the model alone).
    Compact rows are packed (varlen) with flash-attn and padded to the longest kept row with
    SDPA / eager (``layout="auto"``), whose packed form would need a dense ``[K, K]`` mask."""
    from aimkp.models import collate_rows

    rows = list(rows)
    pairs = pairs_of(rows)
    w0 = provisional_weights(rows, n_total, reduce)
    orig_rows = torch.tensor([r for r, c in enumerate(rows) if c.kind is None], dtype=torch.long)
    keeps = [build_keep(samples[c.sample], c.kind, c.stride) for c in rows]
    batch = collate_rows(
        loaded,
        list(samples),
        keeps,
        [c.sample for c in rows],
        mode=mask_mode,
        device=device,
        layout=layout,
    )
    return StepRows(rows=rows, pairs=pairs, w0=w0, orig_rows=orig_rows, keeps=keeps, batch=batch)


def forward_backward(
    loaded: LoadedModel,
    batch: RowBatch,
    objective: Callable[[torch.Tensor], torch.Tensor],
    *,
    device: Device,
    bf16: bool,
) -> RowLosses:
    """Row forward (under bf16 autocast when asked) and ``objective(loss_sum).backward()``;
    returns the :class:`RowLosses` with ``loss_sum [R]`` in fp32."""
    from aimkp.models import forward_rows

    with autocast_ctx(device, bf16):
        out = forward_rows(loaded, batch)
    loss_sum = out.loss_sum.float()
    objective(loss_sum).backward()
    return replace(out, loss_sum=loss_sum)


def weighted_sum(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Objective ``sum_r w_r loss_sum_r`` (``w`` cast to the losses' device and dtype)."""
    return lambda loss_sum: (loss_sum * w.to(loss_sum.device, loss_sum.dtype)).sum()


def _check_tokens(
    samples: Sequence[EncodedSample], rows: Sequence[Copy], n_tokens: torch.Tensor
) -> None:
    want = torch.tensor([int(samples[c.sample].n_answer_tokens) for c in rows])
    got = n_tokens.detach().cpu().long().reshape(-1)
    if not torch.equal(want, got):
        raise ValueError(
            f"forward_rows counted answer tokens {got.tolist()}, expected {want.tolist()}"
        )


def sft_step(
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    n_total: float,
    *,
    mask_mode: str = "compact",
    device: Device = "cpu",
    bf16: bool = False,
) -> StepResult:
    """Plain fine-tuning micro-step: ``sum_i loss_sum_i / n_total`` backward (originals only)."""
    if n_total <= 0:
        raise ValueError(f"total answer tokens must be > 0, got {n_total}")
    rows = [Copy(b, None, 1) for b in range(len(samples))]
    plan = plan_rows(loaded, samples, rows, n_total, mask_mode=mask_mode, device=device)
    out = forward_backward(
        loaded,
        plan.batch,
        lambda loss_sum: loss_sum.sum() / n_total,
        device=device,
        bf16=bf16,
    )
    n_ans = int(out.n_tokens.sum())
    return StepResult(
        loss=float(out.loss_sum.detach().sum()) / max(1, n_ans),
        n_samples=len(samples),
        n_rows=len(rows),
        n_answer_tokens=n_ans,
        n_input_tokens=plan.n_input_tokens,
        rows=plan.rows,
        ran=out.ran,
    )


def _check_embedding_hookable(loaded: LoadedModel) -> None:
    from aimkp.ops import MaskedEmbedding

    emb = loaded.adapter.embed_tokens
    if emb.weight.requires_grad and not isinstance(emb, MaskedEmbedding):
        raise ValueError(
            "aimkp_step: the input embedding is trainable but is a plain "
            f"{type(emb).__name__}, which the row forward bypasses (it calls the fused op on the "
            "weight directly), so the per-sample gradient engine would miss its per-row "
            "gradients; call aimkp.models.forward.use_masked_embedding_module(loaded) first "
            "(the training loop does) or freeze it"
        )


def _original_norms(
    plan: StepRows, samples: Sequence[EncodedSample], gram_norms: torch.Tensor
) -> torch.Tensor:
    """Norms of the rows' weighted gradients -> norm of each original's mean-CE gradient [B]."""
    orig_rows = plan.orig_rows
    n_i = torch.tensor([float(samples[plan.rows[r].sample].n_answer_tokens) for r in orig_rows])
    return gram_norms.detach().double().cpu()[orig_rows] / (plan.w0[orig_rows] * n_i)


def aimkp_step(
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    indices: Sequence[int],
    strides: StrideTable,
    n_total: float,
    *,
    tau_text: float = 0.1,
    tau_image: float = 0.4,
    reduce: str = "mean",
    grand_threshold: float | None = None,
    mask_mode: str = "compact",
    device: Device = "cpu",
    bf16: bool = False,
    update_strides: bool = True,
) -> StepResult:
    """AimKP micro-step on ``samples`` (encoded; dataset indices ``indices``): one forward and one
    backward over all copies, then the filter and an exact reweight of ``.grad``.

    ``.grad`` of the trainable parameters gains ``sum_i n_i / n_total * mean_{kept c} grad CE_ic``
    (``sum`` over kept copies with ``reduce="sum"``). Strides of the visited samples are updated.
    """
    from aimkp.engine import per_sample_grad_gram

    if n_total <= 0:
        raise ValueError(f"total answer tokens must be > 0, got {n_total}")
    _check_embedding_hookable(loaded)
    rows = build_rows(samples, indices, strides)
    plan = plan_rows(
        loaded, samples, rows, n_total, reduce=reduce, mask_mode=mask_mode, device=device
    )
    has_pairs = plan.pairs.shape[0] > 0
    need_gram = has_pairs or grand_threshold is not None
    engine: contextlib.AbstractContextManager = contextlib.nullcontext()
    if need_gram:
        engine = per_sample_grad_gram(
            loaded.model,
            pairs=plan.pairs.to(device) if has_pairs else None,
            cu_seqlens=plan.batch.cu_seqlens,
            num_rows=len(plan.rows),
            keep_for_reweight=True,
            module_rows=plan.batch.module_rows,
        )
    with engine as gram:
        out = forward_backward(loaded, plan.batch, weighted_sum(plan.w0), device=device, bf16=bf16)
    decision = decide(
        plan.rows,
        gram.cosines if has_pairs else torch.zeros(0),
        n_total,
        tau_text=tau_text,
        tau_image=tau_image,
        reduce=reduce,
        grand_threshold=grand_threshold,
        orig_norms=None if grand_threshold is None else _original_norms(plan, samples, gram.norms),
        pairs=plan.pairs,
        provisional=plan.w0,
    )
    if gram is not None and not torch.allclose(
        decision.row_scale, torch.ones_like(decision.row_scale)
    ):
        gram.reweight(decision.row_scale.to(device=out.loss_sum.device, dtype=torch.float32))
    _check_tokens(samples, plan.rows, out.n_tokens)
    if update_strides:
        for b, i in enumerate(indices):
            strides.update(int(i), decision.text_passed[b], decision.image_passed[b])
    ls = out.loss_sum.detach().cpu()
    n_ans = int(out.n_tokens.detach().cpu()[plan.orig_rows].sum())
    return StepResult(
        loss=float(ls[plan.orig_rows].sum()) / max(1, n_ans),
        n_samples=len(samples),
        n_rows=len(plan.rows),
        n_answer_tokens=n_ans,
        n_input_tokens=plan.n_input_tokens,
        rows=plan.rows,
        decision=decision,
        engine_backend=None if gram is None else getattr(gram, "backend", None),
        ran=out.ran,
    )
