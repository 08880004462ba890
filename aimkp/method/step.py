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

Non-finite rows never reach ``.grad``: a row whose loss or engine norm is non-finite gets scale
0 in the same ``reweight`` (a non-finite original: every row of its sample), which removes it
exactly; without the engine (SFT, or an AimKP step with no masked copy) the losses are checked
between the forward and the backward, and a step with a non-finite loss re-runs its forward and
backward over the finite samples only (:func:`finite_only_backward`). Either way the excluded
rows are counted in ``StepResult.nonfinite_rows``.

``reweight="correction"`` (``--reweight``, :mod:`aimkp.method.correction`) replaces the stash:
the engine keeps only norms / dots, the losses are checked before the backward (a non-finite one:
no backward, re-run over the finite samples), and after the decision one more forward + backward
over the affected samples' rows with weights ``w - w0`` makes ``.grad`` the kept set's gradient.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from aimkp.method.gf import GFDecision, decide, pairs_of, provisional_weights
from aimkp.method.pmm import Copy, StrideTable, build_keep
from aimkp.models.adapter import EncodedSample

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
    nonfinite_rows: int = 0  # rows left out of .grad because their loss or gradient was not finite
    reweight: str | None = None  # how the copies were weighted: "stash" / "correction" (engine)
    correction_rows: int = 0  # rows of the correction pass (0: none ran)


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
    out = forward_losses(loaded, batch, device=device, bf16=bf16)
    objective(out.loss_sum).backward()
    return out


def forward_losses(
    loaded: LoadedModel, batch: RowBatch, *, device: Device, bf16: bool
) -> RowLosses:
    """Row forward (under bf16 autocast when asked); ``loss_sum [R]`` in fp32, with autograd."""
    from aimkp.models import forward_rows

    runner = row_runner(loaded)
    with autocast_ctx(device, bf16):
        out = forward_rows(loaded, batch) if runner is None else runner(batch)
    return replace(out, loss_sum=out.loss_sum.float())


def row_runner(loaded: LoadedModel) -> Callable[[RowBatch], RowLosses] | None:
    """Under ``--fsdp`` the module the rows run through (the FSDP2 root,
    :class:`aimkp.train.fsdp.RowRunner`), else None (rows run by ``forward_rows``)."""
    return getattr(loaded, "row_runner", None)


def finite_only_backward(
    loaded: LoadedModel,
    plan: StepRows,
    objective: Callable[[torch.Tensor], torch.Tensor],
    *,
    device: Device,
    bf16: bool,
) -> tuple[RowLosses | None, torch.Tensor]:
    """Forward, then the backward only when every row's loss is finite.

    Returns ``(losses, bad [B])``: ``losses`` is None (no backward ran, ``.grad`` untouched) when
    some sample's loss is not finite; the caller then re-runs the step over the other samples.
    Checking between forward and backward costs nothing in the usual (finite) case; masking the
    objective instead would not be exact (0 times a non-finite activation gradient is NaN)."""
    out = forward_losses(loaded, plan.batch, device=device, bf16=bf16)
    bad = nonfinite_samples(plan, out.loss_sum)
    if bool(bad.any()) and row_runner(loaded) is not None:
        # --fsdp: the ranks run their forwards and backwards in lockstep (each all-gathers the
        # shards), so the backward runs; its non-finite gradient skips the optimizer step
        log.warning("non-finite loss under --fsdp: this optimizer step will be skipped")
    elif bool(bad.any()):
        return None, bad
    objective(out.loss_sum).backward()
    return out, bad


def nonfinite_samples(plan: StepRows, loss_sum: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[B]`` (CPU): samples having a row whose ``loss_sum [R]`` is not finite."""
    finite = torch.isfinite(loss_sum.detach()).cpu()
    bad = torch.zeros(int(plan.orig_rows.numel()), dtype=torch.bool)
    for r, c in enumerate(plan.rows):
        bad[c.sample] |= not bool(finite[r])
    return bad


def without_samples(
    bad: torch.Tensor, step: Callable[[list[int]], StepResult], n_rows: int
) -> StepResult:
    """Re-run a micro-step (``step(kept sample positions)``) without the ``bad [B]`` samples;
    the result counts the excluded rows (``n_rows``: rows of the full micro-step)."""
    keep = [b for b in range(int(bad.numel())) if not bool(bad[b])]
    res = step(keep) if keep else StepResult(0.0, 0, 0, 0, 0)
    res.nonfinite_rows += n_rows - res.n_rows
    res.n_rows = n_rows  # as in an engine step: the micro-step's rows, excluded ones included
    log.warning("non-finite loss in %d sample(s) of a micro-step: excluded", int(bad.sum()))
    return res


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
    out, bad = finite_only_backward(
        loaded, plan, lambda loss_sum: loss_sum.sum() / n_total, device=device, bf16=bf16
    )
    if out is None:
        return without_samples(
            bad,
            lambda keep: sft_step(
                loaded,
                [samples[b] for b in keep],
                n_total,
                mask_mode=mask_mode,
                device=device,
                bf16=bf16,
            ),
            len(rows),
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
    plan: StepRows,
    samples: Sequence[EncodedSample],
    gram_norms: torch.Tensor,
    row_ok: torch.Tensor,
) -> torch.Tensor:
    """Norms of the rows' weighted gradients -> norm of each original's mean-CE gradient [B].
    A non-finite original (excluded anyway) gets the median of the others, so the GraNd
    z-scores of the finite samples stay defined."""
    orig_rows = plan.orig_rows
    n_i = torch.tensor([float(samples[plan.rows[r].sample].n_answer_tokens) for r in orig_rows])
    norms = gram_norms.detach().double().cpu()[orig_rows] / (plan.w0[orig_rows] * n_i)
    ok = row_ok[orig_rows]
    if not bool(ok.all()):
        norms[~ok] = norms[ok].median() if bool(ok.any()) else 0.0
    return norms


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
    reweight: str = "stash",
) -> StepResult:
    """AimKP micro-step on ``samples`` (encoded; dataset indices ``indices``): one forward and one
    backward over all copies, then the filter and an exact reweight of ``.grad``.

    ``.grad`` of the trainable parameters gains ``sum_i n_i / n_total * mean_{kept c} grad CE_ic``
    (``sum`` over kept copies with ``reduce="sum"``). Strides of the visited samples are updated.
    ``reweight``: how ``.grad`` gets the final weights, ``"stash"``, ``"correction"`` (a second
    forward + backward over the affected samples, no stash) or ``"auto"`` (by memory); see
    :mod:`aimkp.method.correction`.
    """
    from aimkp.engine import per_sample_grad_gram
    from aimkp.method.correction import REWEIGHT_WAYS, choose_reweight, correction_backward

    if n_total <= 0:
        raise ValueError(f"total answer tokens must be > 0, got {n_total}")
    if reweight not in REWEIGHT_WAYS:
        raise ValueError(f"reweight must be one of {REWEIGHT_WAYS}, got {reweight!r}")
    _check_embedding_hookable(loaded)
    rows = build_rows(samples, indices, strides)
    plan = plan_rows(
        loaded, samples, rows, n_total, reduce=reduce, mask_mode=mask_mode, device=device
    )

    def without(keep: list[int]) -> StepResult:  # the same step over the samples ``keep``
        return aimkp_step(
            loaded,
            [samples[b] for b in keep],
            [indices[b] for b in keep],
            strides,
            n_total,
            tau_text=tau_text,
            tau_image=tau_image,
            reduce=reduce,
            grand_threshold=grand_threshold,
            mask_mode=mask_mode,
            device=device,
            bf16=bf16,
            update_strides=update_strides,
            reweight=reweight,
        )

    has_pairs = plan.pairs.shape[0] > 0
    need_gram = has_pairs or grand_threshold is not None
    way = None
    if not need_gram:  # no engine: check the losses between forward and backward
        out, bad = finite_only_backward(
            loaded, plan, weighted_sum(plan.w0), device=device, bf16=bf16
        )
        if out is None:
            return without_samples(bad, without, len(plan.rows))
        gram = None
    else:
        way = choose_reweight(
            reweight, loaded.model, plan.n_input_tokens, len(plan.rows), device, bf16
        )
        engine = per_sample_grad_gram(
            loaded.model,
            pairs=plan.pairs.to(device) if has_pairs else None,
            cu_seqlens=plan.batch.cu_seqlens,
            num_rows=len(plan.rows),
            keep_for_reweight=way == "stash",
            module_rows=plan.batch.module_rows,
        )
        with engine as gram:
            if way == "stash":
                out = forward_backward(
                    loaded, plan.batch, weighted_sum(plan.w0), device=device, bf16=bf16
                )
            else:  # no stash: a non-finite row could not be removed after the backward
                # (NaN - NaN); check the losses first, as without the engine: on a non-finite
                # one no backward runs and the step re-runs over the finite samples
                out, bad = finite_only_backward(
                    loaded, plan, weighted_sum(plan.w0), device=device, bf16=bf16
                )
        if out is None:
            return without_samples(bad, without, len(plan.rows))
    row_ok = _finite_rows(out.loss_sum, gram)
    excluded = _excluded_rows(plan, row_ok)
    decision = decide(
        plan.rows,
        _pair_cosines(plan, gram, excluded) if has_pairs else torch.zeros(0),
        n_total,
        tau_text=tau_text,
        tau_image=tau_image,
        reduce=reduce,
        grand_threshold=grand_threshold,
        orig_norms=None
        if grand_threshold is None
        else _original_norms(plan, samples, gram.norms, row_ok),
        pairs=plan.pairs,
        provisional=plan.w0,
    )
    decision.row_scale[excluded] = 0.0
    decision.weights[excluded] = 0.0
    correction_rows = 0
    if way == "stash" and not torch.allclose(
        decision.row_scale, torch.ones_like(decision.row_scale)
    ):
        gram.reweight(decision.row_scale.to(device=out.loss_sum.device, dtype=torch.float32))
    elif way == "correction" and bool(excluded.any()):
        # a row whose loss is finite (non-finite losses ran no backward) but whose gradient is
        # not: its NaN / inf is in .grad already and no correction can subtract it, so no pass
        # runs; the step's gradient stays non-finite and the loop skips the optimizer step
        # (aimkp.method.nonfinite.SkipGuard) instead of letting it reach the weights
        log.warning("non-finite gradient with --reweight correction: optimizer step lost")
    elif way == "correction":
        correction_rows = correction_backward(
            loaded,
            samples,
            plan,
            decision.weights,
            reduce=reduce,
            mask_mode=mask_mode,
            device=device,
            bf16=bf16,
        )
    _check_tokens(samples, plan.rows, out.n_tokens)
    lost = excluded[plan.orig_rows]  # [B] samples left out whole
    if update_strides:  # an excluded sample's copies tell nothing: its strides stay
        for b, i in enumerate(indices):
            if not bool(lost[b]):
                strides.update(int(i), decision.text_passed[b], decision.image_passed[b])
    orig = plan.orig_rows[~lost]
    ls = out.loss_sum.detach().cpu()
    n_ans = int(out.n_tokens.detach().cpu()[orig].sum())
    if bool(excluded.any()):
        log.warning("non-finite loss or gradient in %d row(s): excluded", int(excluded.sum()))
    return StepResult(
        loss=float(ls[orig].sum()) / max(1, n_ans),
        n_samples=len(samples),
        n_rows=len(plan.rows),
        n_answer_tokens=n_ans,
        n_input_tokens=plan.n_input_tokens,
        rows=plan.rows,
        decision=decision,
        engine_backend=None if gram is None else getattr(gram, "backend", None),
        ran=out.ran,
        nonfinite_rows=int(excluded.sum()),
        reweight=way,
        correction_rows=correction_rows,
    )


def _finite_rows(loss_sum: torch.Tensor, gram: object | None) -> torch.Tensor:
    """BoolTensor ``[R]`` (CPU): rows whose loss and (with the engine) gradient norm are finite."""
    ok = torch.isfinite(loss_sum.detach()).cpu()
    if gram is not None:
        ok &= gram.finite_rows().detach().cpu()  # type: ignore[attr-defined]
    return ok


def _pair_cosines(plan: StepRows, gram: object, excluded: torch.Tensor) -> torch.Tensor:
    """``[P]`` cosines, NaN for a pair with an excluded row (the filter then rejects the copy,
    so the mean over a sample's kept copies counts only finite ones)."""
    cos = gram.cosines.detach().float().cpu().clone()  # type: ignore[attr-defined]
    pairs = plan.pairs
    cos[excluded[pairs[:, 0]] | excluded[pairs[:, 1]]] = float("nan")
    return cos


def _excluded_rows(plan: StepRows, row_ok: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[R]``: the non-finite rows, and every row of a sample whose original is."""
    lost = ~row_ok[plan.orig_rows]  # [B]
    sample_of = torch.tensor([c.sample for c in plan.rows], dtype=torch.long)
    return ~row_ok | lost[sample_of]
