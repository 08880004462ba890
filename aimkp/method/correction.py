"""The two exact ways of weighting the copies after the filter (``--reweight``), side by side:
:func:`engine_keeps_stash` / :func:`checks_losses_first` say what each needs before the backward,
:func:`apply_weights` applies the decision after it.

- ``stash``: the engine keeps, per hooked layer, what rebuilds each row's gradient
  (``keep_for_reweight=True``; ``aimkp.engine.reweight``), and ``gram.reweight(w / w0)`` turns
  ``.grad`` into the kept set's gradient without another pass. Costs the stash's memory.
- ``correction``: the engine keeps only norms / dots (no stash). After the decision, the rows of
  the samples whose weights changed (a rejected copy, a GraNd-pruned sample) run ONE more forward +
  backward with loss weights ``w - w0``; ``.grad`` then holds
  ``sum_r w0_r G_r + sum_r (w_r - w0_r) G_r = sum_r w_r G_r``, the same gradient up to float
  rounding. Costs a forward + backward over the affected rows (none when every copy is kept).
  Exact only when the forward is deterministic (LoRA dropout 0): the second forward draws other
  dropout masks, so with dropout the correction removes a differently-masked gradient.
- ``auto`` picks by memory: ``stash`` on the CPU (so CPU results and the demo do not change) and
  on CUDA when the estimated stash takes at most :data:`STASH_SHARE` of the free device memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from aimkp.engine.gram import GradGram
from aimkp.method.gf import GFDecision
from aimkp.method.options import REWEIGHT_WAYS, StepOptions
from aimkp.method.rows import StepRows, forward_backward, plan_rows, weighted_sum
from aimkp.models import LoadedModel
from aimkp.models.adapter import EncodedSample
from aimkp.spans import span

__all__ = [
    "REWEIGHT_WAYS",
    "apply_weights",
    "auto_way",
    "checks_losses_first",
    "choose_reweight",
    "correction_backward",
    "engine_keeps_stash",
    "stash_bytes",
]

log = logging.getLogger(__name__)

#: ``auto`` keeps the stash while it takes at most this share of the free device memory. Autograd
#: saves about 4x the (per-row) stash per decoder layer (docs/memory-plan.md:
#: 487 vs 114 MiB per layer), so a stash above ~1/5 of what is free before the forward would leave
#: the activations no room.
STASH_SHARE = 0.2


def stash_bytes(model: nn.Module, n_tokens: int, n_rows: int, element_size: int) -> int:
    """Estimated bytes the engine's ``"auto"`` reweight storage keeps for ``n_rows`` rows of
    ``n_tokens`` tokens in all (``aimkp.engine.rules.linear`` ``stash``): per trainable
    ``[d_out, d_in]`` weight the smaller of the tokens (``N (d_in + d_out)`` elements of
    ``element_size`` bytes) and the fp32 per-row gradients (``R d_out d_in``); per other trainable
    weight (norms, embeddings) its tokens ``2 N d``. Every layer is counted with all ``N`` tokens
    (the projector sees fewer): an upper bound."""
    total = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or not w.requires_grad:
            continue
        if isinstance(mod, nn.Linear):
            d_out, d_in = w.shape
            total += min(n_rows * d_out * d_in * 4, n_tokens * (d_in + d_out) * element_size)
        else:
            total += 2 * n_tokens * int(w.shape[-1]) * element_size
    return int(total)


def auto_way(stash: float, free: float) -> str:
    """``auto``'s rule: ``"stash"`` while the stash (bytes) takes at most :data:`STASH_SHARE` of
    the ``free`` device memory (bytes, before the step), else ``"correction"``."""
    return "stash" if stash <= STASH_SHARE * free else "correction"


def choose_reweight(
    reweight: str,
    model: nn.Module,
    n_tokens: int,
    n_rows: int,
    device: torch.device | str,
    amp_dtype: torch.dtype | None,
) -> str:
    """``"stash"`` or ``"correction"`` for ``reweight`` (one of :data:`REWEIGHT_WAYS`) and
    ``n_rows`` rows of ``n_tokens`` tokens in all, computed in ``amp_dtype`` (None: fp32)."""
    if reweight not in REWEIGHT_WAYS:
        raise ValueError(f"reweight must be one of {REWEIGHT_WAYS}, got {reweight!r}")
    device = torch.device(device)
    if reweight != "auto":
        return reweight
    if device.type != "cuda" or has_active_dropout(model):
        # the correction pass re-draws dropout masks, so it is exact only without dropout
        return "stash"
    free, _ = torch.cuda.mem_get_info(device)
    element_size = 4 if amp_dtype is None else amp_dtype.itemsize
    return auto_way(stash_bytes(model, n_tokens, n_rows, element_size), free)


def has_active_dropout(model: nn.Module) -> bool:
    """True when a forward of ``model`` draws dropout masks (training mode, some p > 0, e.g.
    LoRA dropout 0.05): a second forward over some rows would not see the first one's masks."""
    return model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def affected_samples(plan: StepRows, weights: torch.Tensor) -> list[int]:
    """Sample positions ``[b]`` having a row whose final weight differs from its ``w0``."""
    changed = ~torch.isclose(weights, plan.w0, rtol=1e-12, atol=0.0)
    return sorted({plan.rows[r].sample for r in torch.nonzero(changed).flatten().tolist()})


def engine_keeps_stash(way: str) -> bool:
    """The engine keeps what rebuilds each row's gradient (``keep_for_reweight``) for the stash."""
    return way == "stash"


def checks_losses_first(way: str) -> bool:
    """Without the stash a non-finite row could not be removed after the backward (NaN - NaN):
    the losses are checked between forward and backward (a non-finite one: no backward, the step
    re-runs over the finite samples)."""
    return way != "stash"


def apply_weights(
    way: str,
    gram: GradGram,
    decision: GFDecision,
    excluded: torch.Tensor,
    *,
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    plan: StepRows,
    opts: StepOptions,
) -> int:
    """Turn ``.grad`` (every row at its provisional weight ``w0``) into the decision's weighting,
    the ``excluded [R]`` rows removed. Returns the rows of the correction pass (0: none ran).

    - stash: ``gram.reweight(w / w0)`` rescales each row's stashed gradient (no-op when every
      scale is 1).
    - correction: one more forward + backward with weights ``w - w0``
      (:func:`correction_backward`). A row whose loss is finite (non-finite losses ran no
      backward) but whose gradient is not has its NaN / inf in ``.grad`` already and no
      correction can subtract it, so no pass runs; the step's gradient stays non-finite and the
      loop skips the optimizer step (:class:`aimkp.method.nonfinite.SkipGuard`) instead of
      letting it reach the weights."""
    if way == "stash":
        scale = decision.row_scale
        if not torch.allclose(scale, torch.ones_like(scale)):
            gram.reweight(scale.to(device=plan.batch.input_ids.device, dtype=torch.float32))
        return 0
    if bool(excluded.any()):
        log.warning("non-finite gradient with --reweight correction: optimizer step lost")
        return 0
    return correction_backward(loaded, samples, plan, decision.weights, opts)


def correction_backward(
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    plan: StepRows,
    weights: torch.Tensor,
    opts: StepOptions,
) -> int:
    """Forward + backward of the affected samples' rows with loss weights ``weights - w0``
    (``[R]`` float64 each), which turns ``.grad`` from the provisional into the final weighting.
    Every row of an affected sample is run (its original too: the rows' plan needs it) and
    rebuilt with the same copy and stride, so its keep mask is the first pass's. Returns the rows
    run (0: nothing to correct, no pass)."""
    affected = affected_samples(plan, weights)
    if not affected:
        return 0
    new_pos = {b: k for k, b in enumerate(affected)}
    picked = [r for r, c in enumerate(plan.rows) if c.sample in new_pos]
    rows = [replace(plan.rows[r], sample=new_pos[plan.rows[r].sample]) for r in picked]
    n_total = 1.0  # the sub-plan's own provisional weights are not used
    with span("correction"):
        sub = plan_rows(loaded, [samples[b] for b in affected], rows, n_total, opts)
        delta = (weights - plan.w0)[torch.tensor(picked, dtype=torch.long)]
        forward_backward(loaded, sub.batch, weighted_sum(delta), opts)
    return len(rows)
