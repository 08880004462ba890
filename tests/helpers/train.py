"""Records and gradient access shared by the training-step tests."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from aimkp.data import Record
from aimkp.method.pmm import StrideTable
from aimkp.models import RowLosses
from aimkp.spans import tapping

WORDS = "red blue green circle square tree cat dog house sun moon star flower car boat".split()


def varied_records(n: int, seed: int = 0, with_image: bool = True):
    """``n`` records of random 64 x 64 images and 3-6 word texts, record 2 without an image."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        # vary the lengths: odd text sizes, one record without an image
        text = " ".join(rng.choice(WORDS, 3 + (i % 4)))
        kps = [str(k) for k in rng.choice(WORDS, 1 + i % 2, replace=False)]
        has_img = with_image and i != 2
        out.append(Record(id=str(i), text=text, keyphrases=kps, image=img if has_img else None))
    return out


def trainable_params(loaded):
    """The parameters the optimizer would update, in ``parameters()`` order."""
    return [p for p in loaded.model.parameters() if p.requires_grad]


def trainable_grads(loaded):
    """Copies of their ``.grad``."""
    return [p.grad.detach().clone() for p in trainable_params(loaded)]


def zero_trainable_grads(loaded):
    """``.grad = None`` on each."""
    for p in trainable_params(loaded):
        p.grad = None


def poison_row_loss(stack: contextlib.ExitStack, row: int, calls: int = 10**9) -> None:
    """Make ``row``'s loss (hence its gradient) NaN in the next ``calls`` row forwards of the
    step, through the step's ``row_losses`` tap (:mod:`aimkp.spans`), until ``stack`` closes."""
    left = [calls]

    def poisoned(out: RowLosses) -> RowLosses:
        if left[0] <= 0:
            return out
        left[0] -= 1
        ls = out.loss_sum
        bad = ls[row : row + 1] * float("nan")  # only this row's backward sees the NaN
        return replace(out, loss_sum=torch.cat([ls[:row], bad, ls[row + 1 :]]))

    stack.enter_context(tapping("row_losses", poisoned))


def weights_after_step(loaded, run_step, **adamw) -> list[torch.Tensor]:
    """Trainable weights after ``run_step()`` and one AdamW step (lr 1e-3, eps 1e-5, or
    ``adamw``) from the current weights (the weights are restored after).

    eps 1e-5, not AdamW's 1e-8: one step moves a coordinate by ``lr * g / (|g| + eps)``, so with
    1e-8 a coordinate whose gradient is ~1e-8 turns float32 rounding of the gradient (a
    different summation order of the same rows) into up to ~0.5% of lr (measured 3e-6 at lr
    1e-3), and comparisons of two exact ways of the same step would depend on that rounding."""
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.grad = None
    res = run_step()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
    torch.optim.AdamW(params, **{"lr": 1e-3, "eps": 1e-5, **adamw}).step()
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    return after, res


def lora_tiny_llava(n: int = 4) -> tuple:
    """``(loaded, encoded samples)``: tiny-llava (seed 0, tokenizer trained on ``n`` varied
    records) with LoRA r=8 (dropout 0) and a trainable projector, fp32."""
    from aimkp.models import load_model
    from aimkp.models.lora import apply_lora

    recs = varied_records(n)
    texts = [r.text for r in recs] + [", ".join(r.keyphrases) for r in recs]
    loaded = load_model("tiny-llava", train_texts=texts, seed=0)
    apply_lora(loaded, r=8, alpha=16, dropout=0.0)
    return loaded, [loaded.adapter.encode(r) for r in recs]


def mixed_strides() -> StrideTable:
    """Strides of 4 samples with text / image copies at several strides (one text stride
    frozen): the table the non-finite and reweight tests step with."""
    t = StrideTable(4)
    t.text[:] = torch.tensor([2, 4, 2, -2])
    t.image[:] = torch.tensor([2, 4, 2, 8])
    return t


def assert_step_matches_reference(res, info, g_step, g_ref, cos_atol: float) -> None:
    """An ``aimkp_step`` result and its gradients (``g_step``) against ``reference_step``'s
    per-sample ``info`` and gradients (``g_ref``): the same kept copies, cosines to ``cos_atol``,
    gradients to ``2e-6`` of the largest entry (rtol 1e-4)."""
    assert res.decision.kept.tolist() == [k for i in info for k in i["kept"]]
    torch.testing.assert_close(
        res.decision.cosines,
        torch.tensor([c for i in info for c in i["cosines"]], dtype=torch.float32),
        atol=cos_atol,
        rtol=0,
    )
    scale = max(float(g.abs().max()) for g in g_ref)
    for a, r in zip(g_step, g_ref):
        torch.testing.assert_close(a, r, atol=2e-6 * scale, rtol=1e-4)


def encoded_with_twin_strides(loaded, recs, text: int, image: int) -> tuple:
    """``(samples, n_total, t_step, t_ref)``: ``recs`` encoded, their answer tokens, and two equal
    stride tables (every text stride ``text``, image stride ``image``) for a step and the
    reference step to update side by side."""
    samples = [loaded.adapter.encode(r) for r in recs]
    n_total = float(sum(s.n_answer_tokens for s in samples))
    tables = StrideTable(len(recs)), StrideTable(len(recs))
    for t in tables:
        t.text[:] = text
        t.image[:] = image
    return samples, n_total, *tables
