"""The two exact ways of weighting the copies after the filter (``--reweight``).

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

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from aimkp.train.config import REWEIGHT_WAYS

if TYPE_CHECKING:
    from aimkp.method.step import StepRows
    from aimkp.models import LoadedModel
    from aimkp.models.adapter import EncodedSample

__all__ = ["REWEIGHT_WAYS", "auto_way", "choose_reweight", "correction_backward", "stash_bytes"]

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
    reweight: str, model: nn.Module, n_tokens: int, n_rows: int, device: torch.device | str, bf16
) -> str:
    """``"stash"`` or ``"correction"`` for ``reweight`` (one of :data:`REWEIGHT_WAYS`)."""
    if reweight not in REWEIGHT_WAYS:
        raise ValueError(f"reweight must be one of {REWEIGHT_WAYS}, got {reweight!r}")
    device = torch.device(device)
    if reweight != "auto":
        return reweight
    if device.type != "cuda" or has_active_dropout(model):
        # the correction pass re-draws dropout masks, so it is exact only without dropout
        return "stash"
    free, _ = torch.cuda.mem_get_info(device)
    return auto_way(stash_bytes(model, n_tokens, n_rows, 2 if bf16 else 4), free)


def has_active_dropout(model: nn.Module) -> bool:
    """True when a forward of ``model`` draws dropout masks (training mode, some p > 0, e.g.
    LoRA dropout 0.05): a second forward over some rows would not see the first one's masks."""
    return model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def affected_samples(plan: StepRows, weights: torch.Tensor) -> list[int]:
    """Sample positions ``[b]`` having a row whose final weight differs from its ``w0``."""
    changed = ~torch.isclose(weights, plan.w0, rtol=1e-12, atol=0.0)
    return sorted({plan.rows[r].sample for r in torch.nonzero(changed).flatten().tolist()})


def correction_backward(
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    plan: StepRows,
    weights: torch.Tensor,
    *,
    reduce: str,
    mask_mode: str,
    device: torch.device | str,
    bf16: bool,
) -> int:
    """Forward + backward of the affected samples' rows with loss weights ``weights - w0``
    (``[R]`` float64 each), which turns ``.grad`` from the provisional into the final weighting.
    Every row of an affected sample is run (its original too: the rows' plan needs it) and
    rebuilt with the same copy and stride, so its keep mask is the first pass's. Returns the rows
    run (0: nothing to correct, no pass)."""
    from aimkp.method.step import forward_backward, plan_rows, weighted_sum

    affected = affected_samples(plan, weights)
    if not affected:
        return 0
    new_pos = {b: k for k, b in enumerate(affected)}
    picked = [r for r, c in enumerate(plan.rows) if c.sample in new_pos]
    rows = [replace(plan.rows[r], sample=new_pos[plan.rows[r].sample]) for r in picked]
    n_total = 1.0  # the sub-plan's own provisional weights are not used
    sub = plan_rows(
        loaded,
        [samples[b] for b in affected],
        rows,
        n_total,
        reduce=reduce,
        mask_mode=mask_mode,
        device=device,
    )
    delta = (weights - plan.w0)[torch.tensor(picked, dtype=torch.long)]
    forward_backward(loaded, sub.batch, weighted_sum(delta), device=device, bf16=bf16)
    return len(rows)
