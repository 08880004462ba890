"""One micro-step of training: the AimKP step (PMM copies + one-backward Gradient-based Filtering)
and the plain fine-tuning (SFT) step. Neither calls the optimizer: the loop does, after
``grad_accum`` micro-steps, so accumulation stays exact (every weight divides by the answer-token
count ``n_total`` of the whole accumulated batch, computed before the micro-steps). Both take
their options as one :class:`~aimkp.method.options.StepOptions`.

The AimKP step, for a micro-batch of B encoded samples, reads as its recipe (:func:`aimkp_step`)::

    plan = plan_rows(...)                    # rows: original, text copy if |g_T| > 1, image copy
                                             # if |g_V| > 1; pairs, w0, keep masks, batch
    with per_sample_grad_gram(...) as gram:  # forward and ONE backward of (w0 * loss_sum).sum()
        forward_backward(plan.batch)
    excluded = excluded_rows(...)            # non-finite loss or gradient norm
    decision = decide_copies(...)            # GF on the pair cosines, GraNd on the norms
    apply_weights(...)                       # stash: gram.reweight(w / w0); or a correction pass
    update_strides(...)                      # PMM schedule from the same decision

Non-finite rows never reach ``.grad``: with the stash, a row whose loss or engine norm is
non-finite gets scale 0 in the same reweight (a non-finite original: every row of its sample),
which removes it exactly. Without the stash (``reweight="correction"``, SFT, or no masked copy
and no GraNd, so no engine) the losses are checked between the forward and the backward, and a
micro-step with a non-finite loss runs again over the finite samples only
(:func:`without_nonfinite_samples`). Either way the excluded rows are counted in
``StepResult.nonfinite_rows``. The phases open spans (:mod:`aimkp.spans`) that profilers and the
phase benchmark read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from aimkp.engine.gram import GradGram, per_sample_grad_gram
from aimkp.method.correction import (
    apply_weights,
    checks_losses_first,
    choose_reweight,
    engine_keeps_stash,
)
from aimkp.method.gf import GFDecision, decide
from aimkp.method.options import StepOptions
from aimkp.method.pmm import Copy, StrideTable
from aimkp.method.rows import (
    StepRows,
    autocast_ctx,
    build_rows,
    finite_only_backward,
    forward_backward,
    forward_losses,
    plan_rows,
    weighted_sum,
)
from aimkp.models import LoadedModel, RowLosses
from aimkp.models.adapter import EncodedSample
from aimkp.models.forward import ForwardRecord
from aimkp.ops import MaskedEmbedding
from aimkp.spans import span, tap

__all__ = [
    "StepOptions",
    "StepResult",
    "StepRows",
    "aimkp_step",
    "autocast_ctx",
    "build_rows",
    "forward_backward",
    "forward_losses",
    "plan_rows",
    "sft_step",
    "weighted_sum",
]

log = logging.getLogger(__name__)

DEFAULT_OPTIONS = StepOptions()


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
class RowsRun:
    """What the forward and backward of a micro-step's rows left: the losses, the engine's
    context (None: no engine ran) and ``bad [B]``, the samples with a non-finite loss when the
    losses were checked before the backward (then no backward ran)."""

    losses: RowLosses
    gram: GradGram | None
    bad: torch.Tensor


@dataclass
class NonFiniteLosses:
    """A micro-step attempt that found non-finite losses before its backward (none ran):
    ``bad [B]`` marks the samples to leave out, ``n_rows`` the attempt's rows."""

    bad: torch.Tensor
    n_rows: int


#: ``attempt(kept sample positions)``: a micro-step over those samples.
Attempt = Callable[[list[int]], "StepResult | NonFiniteLosses"]


def aimkp_step(
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    indices: Sequence[int],
    strides: StrideTable,
    n_total: float,
    opts: StepOptions = DEFAULT_OPTIONS,
) -> StepResult:
    """AimKP micro-step on ``samples`` (encoded; dataset indices ``indices``): one forward and one
    backward over all copies, then the filter and an exact reweight of ``.grad``.

    ``.grad`` of the trainable parameters gains ``sum_i n_i / n_total * mean_{kept c} grad CE_ic``
    (``sum`` over kept copies with ``gf_reduce="sum"``). Strides of the visited samples are
    updated (``opts.update_strides``). ``opts.reweight``: how ``.grad`` gets the final weights
    (:mod:`aimkp.method.correction`)."""
    check_step_inputs(loaded, n_total, engine=True)
    with span("step"):
        return without_nonfinite_samples(
            len(samples),
            lambda keep: aimkp_attempt(
                loaded,
                [samples[b] for b in keep],
                [indices[b] for b in keep],
                strides,
                n_total,
                opts,
            ),
        )


def aimkp_attempt(
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    indices: Sequence[int],
    strides: StrideTable,
    n_total: float,
    opts: StepOptions,
) -> StepResult | NonFiniteLosses:
    """The AimKP micro-step's recipe (:class:`NonFiniteLosses` instead of a result when a loss
    was found non-finite before the backward: ``.grad`` untouched)."""
    plan = plan_rows(loaded, samples, build_rows(samples, indices, strides), n_total, opts)
    way = reweight_way(loaded, plan, opts)
    run = rows_forward_backward(loaded, plan, way, opts)
    if bool(run.bad.any()):
        return NonFiniteLosses(run.bad, len(plan.rows))
    excluded = excluded_rows(plan, finite_rows(run.losses.loss_sum, run.gram))
    decision = decide_copies(plan, samples, run.gram, excluded, n_total, opts)
    corrected = 0
    if way is not None and run.gram is not None:
        corrected = apply_weights(
            way, run.gram, decision, excluded, loaded=loaded, samples=samples, plan=plan, opts=opts
        )
    check_tokens(samples, plan.rows, run.losses.n_tokens)
    lost = excluded[plan.orig_rows]  # [B] samples left out whole
    if opts.update_strides:
        update_strides(strides, indices, decision, lost)
    if bool(excluded.any()):
        log.warning("non-finite loss or gradient in %d row(s): excluded", int(excluded.sum()))
    res = step_result(samples, plan, run, orig=plan.orig_rows[~lost])
    res.decision, res.reweight, res.correction_rows = decision, way, corrected
    res.nonfinite_rows = int(excluded.sum())
    return res


def sft_step(
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    n_total: float,
    opts: StepOptions = DEFAULT_OPTIONS,
) -> StepResult:
    """Plain fine-tuning micro-step: ``sum_i loss_sum_i / n_total`` backward (originals only)."""
    check_step_inputs(loaded, n_total, engine=False)
    return without_nonfinite_samples(
        len(samples), lambda keep: sft_attempt(loaded, [samples[b] for b in keep], n_total, opts)
    )


def sft_attempt(
    loaded: LoadedModel, samples: Sequence[EncodedSample], n_total: float, opts: StepOptions
) -> StepResult | NonFiniteLosses:
    """The SFT micro-step (:class:`NonFiniteLosses` when a loss is non-finite: no backward)."""
    rows = [Copy(b, None, 1) for b in range(len(samples))]
    plan = plan_rows(loaded, samples, rows, n_total, opts)
    out, bad = finite_only_backward(loaded, plan, lambda loss_sum: loss_sum.sum() / n_total, opts)
    if bool(bad.any()):
        return NonFiniteLosses(bad, len(rows))
    return step_result(samples, plan, RowsRun(out, None, bad), orig=plan.orig_rows)


def without_nonfinite_samples(n_samples: int, attempt: Attempt) -> StepResult:
    """Run ``attempt`` over every sample; while it finds samples with a non-finite loss, run it
    again without them. The result counts the excluded rows in ``nonfinite_rows`` and the first
    attempt's rows in ``n_rows`` (as a step whose engine excluded them would)."""
    keep = list(range(n_samples))
    first_rows: int | None = None
    while True:
        out = attempt(keep) if keep else StepResult(0.0, 0, 0, 0, 0)
        if isinstance(out, StepResult):
            break
        first_rows = out.n_rows if first_rows is None else first_rows
        log.warning("non-finite loss in %d sample(s) of a micro-step: excluded", int(out.bad.sum()))
        keep = [k for k, bad in zip(keep, out.bad.tolist()) if not bad]
    if first_rows is not None:
        out.nonfinite_rows += first_rows - out.n_rows
        out.n_rows = first_rows
    return out


def check_step_inputs(loaded: LoadedModel, n_total: float, *, engine: bool) -> None:
    """ValueError on a non-positive ``n_total`` or (``engine``) an input embedding the
    per-sample gradient engine cannot see."""
    if n_total <= 0:
        raise ValueError(f"total answer tokens must be > 0, got {n_total}")
    emb = loaded.adapter.embed_tokens
    if engine and emb.weight.requires_grad and not isinstance(emb, MaskedEmbedding):
        raise ValueError(
            "aimkp_step: the input embedding is trainable but is a plain "
            f"{type(emb).__name__}, which the row forward bypasses (it calls the fused op on the "
            "weight directly), so the per-sample gradient engine would miss its per-row "
            "gradients; call aimkp.models.forward.use_masked_embedding_module(loaded) first "
            "(the training loop does) or freeze it"
        )


def reweight_way(loaded: LoadedModel, plan: StepRows, opts: StepOptions) -> str | None:
    """``"stash"`` / ``"correction"``, or None when the step needs no engine (no masked copy
    and no GraNd: nothing to decide)."""
    if not plan.has_pairs and opts.grand_threshold is None:
        return None
    n_tokens, n_rows = plan.n_input_tokens, len(plan.rows)
    return choose_reweight(
        opts.reweight, loaded.model, n_tokens, n_rows, opts.device, opts.amp_dtype
    )


def rows_forward_backward(
    loaded: LoadedModel, plan: StepRows, way: str | None, opts: StepOptions
) -> RowsRun:
    """Forward and backward of every row at its provisional weight ``w0``, under the per-sample
    gradient engine when ``way`` is set (keeping the stash for ``"stash"``). Without the stash
    the losses are checked first (:func:`aimkp.method.correction.checks_losses_first`)."""
    objective = weighted_sum(plan.w0)
    if way is None:
        out, bad = finite_only_backward(loaded, plan, objective, opts)
        return RowsRun(out, None, bad)
    make_gram = tap("grad_gram", per_sample_grad_gram)
    engine = make_gram(
        loaded.model,
        pairs=plan.pairs.to(opts.device) if plan.has_pairs else None,
        cu_seqlens=plan.batch.cu_seqlens,
        num_rows=len(plan.rows),
        keep_for_reweight=engine_keeps_stash(way),
        module_rows=plan.batch.module_rows,
    )
    with engine as gram:
        if checks_losses_first(way):
            out, bad = finite_only_backward(loaded, plan, objective, opts)
        else:
            out = forward_backward(loaded, plan.batch, objective, opts)
            bad = torch.zeros(int(plan.orig_rows.numel()), dtype=torch.bool)
    return RowsRun(out, gram, bad)


def finite_rows(loss_sum: torch.Tensor, gram: GradGram | None) -> torch.Tensor:
    """BoolTensor ``[R]`` (CPU): rows whose loss and (with the engine) gradient norm are finite."""
    ok = torch.isfinite(loss_sum.detach()).cpu()
    if gram is not None:
        ok &= gram.finite_rows().detach().cpu()
    return ok


def excluded_rows(plan: StepRows, row_ok: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[R]``: the non-finite rows, and every row of a sample whose original is."""
    lost = ~row_ok[plan.orig_rows]  # [B]
    sample_of = torch.tensor([c.sample for c in plan.rows], dtype=torch.long)
    return ~row_ok | lost[sample_of]


def decide_copies(
    plan: StepRows,
    samples: Sequence[EncodedSample],
    gram: GradGram | None,
    excluded: torch.Tensor,
    n_total: float,
    opts: StepOptions,
) -> GFDecision:
    """Gradient-based Filtering of the copies on their pair cosines, GraNd pruning of the
    originals on their gradient norms (``opts.grand_threshold``); the ``excluded [R]`` rows get
    weight 0."""
    cosines = torch.zeros(0)
    orig_norms = None
    if gram is not None and plan.has_pairs:
        cosines = pair_cosines(plan, gram, excluded)
    if gram is not None and opts.grand_threshold is not None:
        orig_norms = original_norms(plan, samples, gram.norms, ~excluded)
    decision = decide(
        plan.rows,
        cosines,
        n_total,
        tau_text=opts.tau_text,
        tau_image=opts.tau_image,
        reduce=opts.gf_reduce,
        grand_threshold=opts.grand_threshold,
        orig_norms=orig_norms,
        pairs=plan.pairs,
        provisional=plan.w0,
    )
    decision.row_scale[excluded] = 0.0
    decision.weights[excluded] = 0.0
    return decision


def pair_cosines(plan: StepRows, gram: GradGram, excluded: torch.Tensor) -> torch.Tensor:
    """``[P]`` cosines, NaN for a pair with an excluded row (the filter then rejects the copy,
    so the mean over a sample's kept copies counts only finite ones)."""
    cos = gram.cosines.detach().float().cpu().clone()
    pairs = plan.pairs
    cos[excluded[pairs[:, 0]] | excluded[pairs[:, 1]]] = float("nan")
    return cos


def original_norms(
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


def update_strides(
    strides: StrideTable, indices: Sequence[int], decision: GFDecision, lost: torch.Tensor
) -> None:
    """The PMM schedule from the filter's decision; an excluded sample's (``lost [B]``) copies
    tell nothing: its strides stay."""
    for b, i in enumerate(indices):
        if not bool(lost[b]):
            strides.update(int(i), decision.text_passed[b], decision.image_passed[b])


def check_tokens(
    samples: Sequence[EncodedSample], rows: Sequence[Copy], n_tokens: torch.Tensor
) -> None:
    """ValueError when the row forward counted other answer tokens than the samples hold."""
    want = torch.tensor([int(samples[c.sample].n_answer_tokens) for c in rows])
    got = n_tokens.detach().cpu().long().reshape(-1)
    if not torch.equal(want, got):
        raise ValueError(
            f"forward_rows counted answer tokens {got.tolist()}, expected {want.tolist()}"
        )


def step_result(
    samples: Sequence[EncodedSample], plan: StepRows, run: RowsRun, orig: torch.Tensor
) -> StepResult:
    """The result of a micro-step: loss and answer tokens over the ``orig`` rows (the originals
    that reached ``.grad``), the rows, what ran."""
    n_ans = int(run.losses.n_tokens.detach().cpu()[orig].sum())
    loss = float(run.losses.loss_sum.detach().cpu()[orig].sum()) / max(1, n_ans)
    return StepResult(
        loss=loss,
        n_samples=len(samples),
        n_rows=len(plan.rows),
        n_answer_tokens=n_ans,
        n_input_tokens=plan.n_input_tokens,
        rows=plan.rows,
        engine_backend=None if run.gram is None else run.gram.backend,
        ran=run.losses.ran,
    )
