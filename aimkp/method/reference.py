"""The published AimKP algorithm, as its reference code runs it: the oracle and the benchmark
baseline for :func:`aimkp.method.step.aimkp_step`.

Per sample (batch size 1): one forward per copy (original, text copy, image copy), then one backward
per copy with the graph retained, a clone of every trainable gradient per copy, the cosine of the
flattened gradients of each copy with the original's, the filter (``cos < tau`` rejects), and
``n_i * mean_{kept} grad`` (or the sum, ``reduce="sum"``) added to an accumulator that is divided
by the batch's answer-token count ``n_total`` at the end. Cost: K forwards, K backwards and K full
gradient copies per sample. The decision and the PMM stride update are coded here independently of
:mod:`aimkp.method.gf` so the test compares two implementations.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch

from aimkp.method.options import StepOptions
from aimkp.method.pmm import IMAGE, TEXT, StrideTable, build_keep, has_image, has_text
from aimkp.method.rows import autocast_ctx
from aimkp.method.step import StepResult
from aimkp.models import LoadedModel, collate_rows, forward_rows

#: The reference code's rows: full rows, hidden tokens masked in the attention.
REFERENCE_OPTIONS = StepOptions(mask_mode="attention")


def reference_step(
    loaded: LoadedModel,
    samples: Sequence[Any],
    indices: Sequence[int],
    strides: StrideTable,
    n_total: float,
    opts: StepOptions = REFERENCE_OPTIONS,
) -> tuple[StepResult, list[dict[str, Any]]]:
    """Reference AimKP micro-step; ``.grad`` gains the same quantity as ``aimkp_step``'s with
    the same options (``opts.reweight`` aside: the reference keeps every copy's gradient).

    Returns the step result and, per sample, ``{"kinds", "cosines", "kept"}`` for comparisons.
    """
    tau_text, tau_image, grand_threshold = opts.tau_text, opts.tau_image, opts.grand_threshold
    if n_total <= 0:
        raise ValueError(f"total answer tokens must be > 0, got {n_total}")
    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    prior: list[torch.Tensor | None] = [
        None if p.grad is None else p.grad.detach().clone() for p in params
    ]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    contributions: list[list[torch.Tensor]] = []
    orig_norms: list[float] = []
    info: list[dict[str, Any]] = []
    loss_total, n_ans_total, n_rows, n_in = 0.0, 0, 0, 0
    for sample, idx in zip(samples, indices):
        gt, gv = int(strides.text[idx]), int(strides.image[idx])
        kinds: list[str | None] = [None]
        gs = [1]
        if abs(gt) > 1 and has_text(sample):
            kinds.append(TEXT)
            gs.append(abs(gt))
        if abs(gv) > 1 and has_image(sample):
            kinds.append(IMAGE)
            gs.append(abs(gv))
        n_i = int(sample.n_answer_tokens)
        # one forward per copy (batch size 1), graphs kept alive together as in the reference
        losses = []
        for kind, stride in zip(kinds, gs):
            keep = build_keep(sample, kind, stride)
            n_in += int(keep.sum())
            batch = collate_rows(
                loaded, [sample], [keep], [0], mode=opts.mask_mode, device=opts.device
            )
            with autocast_ctx(opts.device, opts.amp_dtype):
                out = forward_rows(loaded, batch)
            losses.append(out.loss_sum.float().sum() / n_i)  # the copy's mean CE
        # one backward per copy, retained graph, cloned gradients
        grads: list[list[torch.Tensor]] = []
        for c, loss in enumerate(losses):
            for p in params:
                p.grad = None
            loss.backward(retain_graph=c < len(losses) - 1)
            grads.append(
                [
                    torch.zeros_like(p, dtype=torch.float32)
                    if p.grad is None
                    else p.grad.detach().float().clone()
                    for p in params
                ]
            )
        flat = [torch.cat([g.reshape(-1) for g in gl]) for gl in grads]
        cosines = [
            float(torch.nn.functional.cosine_similarity(flat[0], flat[c], dim=0))
            for c in range(1, len(flat))
        ]
        kept = [True]
        text_passed = image_passed = None
        for kind, s in zip(kinds[1:], cosines):
            ok = s >= (tau_text if kind == TEXT else tau_image)
            kept.append(ok)
            if kind == TEXT:
                text_passed = ok
            else:
                image_passed = ok
        chosen = [gl for gl, k in zip(grads, kept) if k]
        scale = n_i / (len(chosen) if opts.gf_reduce == "mean" else 1)
        contrib = [
            functools.reduce(operator.add, (gl[j] for gl in chosen)) * scale
            for j in range(len(params))
        ]
        if grand_threshold is not None:
            contributions.append(contrib)
            orig_norms.append(float(flat[0].norm()))
        else:
            for a, part in zip(acc, contrib):
                a += part
        if opts.update_strides:
            strides.update(int(idx), text_passed, image_passed)
        info.append({"kinds": kinds, "cosines": cosines, "kept": kept})
        loss_total += float(losses[0].detach()) * n_i
        n_ans_total += n_i
        n_rows += len(kinds)
    if grand_threshold is not None:
        x = torch.tensor(orig_norms, dtype=torch.float64)
        prune: torch.Tensor = torch.zeros(len(x), dtype=torch.bool)
        if len(x) >= 3:
            med = x.median()
            mad = (x - med).abs().median() * 1.4826
            if float(mad) > 0:
                prune = (x - med) / mad > grand_threshold
        for b, contrib in enumerate(contributions):
            info[b]["pruned"] = bool(prune[b])
            if not prune[b]:
                for a, part in zip(acc, contrib):
                    a += part
    for p, a, pr in zip(params, acc, prior):
        step_grad = (a / n_total).to(p.dtype)
        p.grad = step_grad if pr is None else pr + step_grad
    return (
        StepResult(
            loss=loss_total / max(1, n_ans_total),
            n_samples=len(samples),
            n_rows=n_rows,
            n_answer_tokens=n_ans_total,
            n_input_tokens=n_in,
        ),
        info,
    )
