"""Row-forward runs shared by the model tests: plain forward + backward, and the same under the
per-sample gradient engine."""

from __future__ import annotations

import torch

from aimkp.engine import per_sample_grad_gram
from aimkp.models import collate_rows, forward_rows

# fp32 throughout. The two modes reorder the same reductions (packed vs padded attention, the
# softmax over a different number of masked entries), so differences are rounding only:
# losses (sums of <= 10 token CEs around 6) to 1e-5 relative, gradients to 1e-4 relative to the
# largest entry of each tensor (sums over ~300 tokens of products of O(1) values).
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def run_rows(loaded, samples, keeps, rows, mode, layout="packed"):
    """One row forward + ``loss_sum.sum().backward()`` from zeroed grads: (batch, RowLosses,
    {name: grad} of the trainable parameters)."""
    loaded.model.zero_grad(set_to_none=True)
    batch = collate_rows(loaded, samples, keeps, rows, mode=mode, device="cpu", layout=layout)
    out = forward_rows(loaded, batch)
    out.loss_sum.sum().backward()
    grads = {
        n: p.grad.detach().clone()
        for n, p in loaded.model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    return batch, out, grads


def engine_run_rows(loaded, samples, keeps, rows, layout):
    """One forward + backward under the engine; per-row losses, grads, norms, cosines, and the
    gradients after reweighting every copy (odd rows) by 0.5."""
    loaded.model.zero_grad(set_to_none=True)
    batch = collate_rows(loaded, samples, keeps, rows, layout=layout)
    pairs = torch.tensor([[r - 1, r] for r in range(1, len(rows), 2)])
    with per_sample_grad_gram(
        loaded.model,
        pairs=pairs,
        cu_seqlens=batch.cu_seqlens,
        num_rows=len(rows),
        keep_for_reweight=True,
        module_rows=batch.module_rows,
    ) as gram:
        out = forward_rows(loaded, batch)
        out.loss_sum.sum().backward()
    params = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    gram.reweight(torch.tensor([1.0 if r % 2 == 0 else 0.5 for r in range(len(rows))]))
    reweighted = {n: p.grad.detach().clone() for n, p in params.items()}
    return batch, out, grads, gram.norms.clone(), gram.cosines.clone(), reweighted
