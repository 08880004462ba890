"""One micro-step of training: the AimKP step (PMM copies + one-backward Gradient-based Filtering)
and the plain fine-tuning (SFT) step. Neither calls the optimizer: the loop does, after
``grad_accum`` micro-steps, so accumulation stays exact (every weight divides by the answer-token
count ``n_total`` of the whole accumulated batch, computed before the micro-steps).

AimKP step, for a micro-batch of B encoded samples::

    rows   = for each sample: original, text copy if |g_T| > 1, image copy if |g_V| > 1     (R rows)
    batch  = collate_rows(rows)               # compact (packed, cu_seqlens) or attention mode
    with per_sample_grad_gram(model, pairs=(orig, copy) rows, keep_for_reweight=True) as gram:
        loss_sum = forward_rows(batch).loss_sum                       # [R]
        (w0 * loss_sum).sum().backward()      # provisional weights: every copy kept
    decision = gf.decide(gram.cosines)        # tau_text / tau_image; originals always kept
    gram.reweight(decision.weights / w0)      # exact gradient of the kept set, no 2nd backward
    strides.update(decision)                  # PMM schedule from the same cosines
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aimkp.train.gf import GFDecision, decide, pairs_of, provisional_weights
from aimkp.train.pmm import Copy, StrideTable, build_keep

log = logging.getLogger(__name__)


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


def autocast_ctx(
    device: torch.device | str, bf16: bool | torch.dtype
) -> contextlib.AbstractContextManager:
    """Autocast on CUDA when asked (``bf16`` True: bf16; a dtype: that dtype, the frozen base's
    half dtype of ``--dtype``), else a no-op context."""
    device = torch.device(device)
    if bf16 and device.type == "cuda":
        return torch.autocast(
            "cuda", dtype=bf16 if isinstance(bf16, torch.dtype) else torch.bfloat16
        )
    return contextlib.nullcontext()


def build_rows(
    samples: Sequence[Any], indices: Sequence[int], strides: StrideTable | None
) -> list[Copy]:
    """Rows of a micro-batch: originals only without a stride table, else every PMM copy."""
    if len(samples) != len(indices):
        raise ValueError(f"{len(samples)} samples but {len(indices)} dataset indices")
    rows: list[Copy] = []
    for b, (s, i) in enumerate(zip(samples, indices)):
        rows += [Copy(b, None, 1)] if strides is None else strides.copies(int(i), s, b)
    return rows


def _collate(
    loaded: Any,
    samples: Sequence[Any],
    rows: Sequence[Copy],
    mode: str,
    device: Any,
    layout: str = "auto",
):
    """Collate one row per copy. The model's row forward runs the frozen vision tower once per
    distinct sample and the trainable projector once per ROW, so the per-row gradient engine sees
    each copy's own projector activations (as if every copy had gone through the model alone).

    Compact rows are packed (varlen) with flash-attn and padded to the longest kept row with
    SDPA / eager (``layout="auto"``), whose packed form would need a dense ``[K, K]`` mask."""
    from aimkp.models import collate_rows

    keeps = [build_keep(samples[c.sample], c.kind, c.stride) for c in rows]
    batch = collate_rows(
        loaded,
        list(samples),
        keeps,
        [c.sample for c in rows],
        mode=mode,
        device=device,
        layout=layout,
    )
    return batch, keeps


def engine_module_rows(
    loaded: Any,
    samples: Sequence[Any],
    rows: Sequence[Copy],
    keeps: Sequence[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``module_rows`` for the engine, for trainable modules whose tokens are not laid out as the
    language model's packed / padded rows:

    - the multimodal projector sees the image tokens of the rows that have an image (h * w each,
      in row order);
    - ``lm_head`` (trainable with full fine-tuning) sees only the positions that predict answer
      tokens, row by row (``n_answer_tokens`` each);
    - a trainable input embedding read with ``compact=True`` (``keeps`` given: the rows' keep
      masks) outputs the kept tokens of every row, packed (``keep.sum()`` each).
    """
    out: dict[str, torch.Tensor] = {}

    def cu_of(counts: list[int]) -> torch.Tensor:
        cu = torch.zeros(len(counts) + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
        return cu

    img = []
    for c in rows:
        s = samples[c.sample]
        img.append(0 if s.grid is None or s.pixel_values is None else s.grid[0] * s.grid[1])
    # the projector sees k vision tokens per image token before merging (Qwen2-VL: k = 4, its
    # LayerNorm runs before the 2 x 2 merge) and one per image token after
    k = int(getattr(loaded.adapter, "vision_tokens_per_image_token", 1))
    proj = loaded.adapter.projector
    prefix = {id(m): n for n, m in loaded.model.named_modules()}.get(id(proj))
    if prefix is not None:
        for sub_name, sub in proj.named_modules():
            if not any(p.requires_grad for p in sub.parameters(recurse=False)):
                continue
            pre_merge = k > 1 and "norm" in type(sub).__name__.lower()
            name = f"{prefix}.{sub_name}" if sub_name else prefix
            out[name] = cu_of([n * k for n in img] if pre_merge else img)
    head = loaded.adapter.lm_head
    head_name = {id(m): n for n, m in loaded.model.named_modules()}.get(id(head))
    if head_name is not None and any(p.requires_grad for p in head.parameters()):
        out[head_name] = cu_of([int(samples[c.sample].n_answer_tokens) for c in rows])
    emb = loaded.adapter.embed_tokens
    emb_name = {id(m): n for n, m in loaded.model.named_modules()}.get(id(emb))
    if keeps is not None and emb_name is not None and emb.weight.requires_grad:
        out[emb_name] = cu_of([int(k.sum()) for k in keeps])
    return out


def _forward(loaded: Any, batch: Any, device: Any, bf16: bool):
    from aimkp.models import forward_rows

    with autocast_ctx(device, bf16):
        out = forward_rows(loaded, batch)
    return out.loss_sum.float(), out.n_tokens


def _check_tokens(samples: Sequence[Any], rows: Sequence[Copy], n_tokens: torch.Tensor) -> None:
    want = torch.tensor([int(samples[c.sample].n_answer_tokens) for c in rows])
    got = n_tokens.detach().cpu().long().reshape(-1)
    if not torch.equal(want, got):
        raise ValueError(
            f"forward_rows counted answer tokens {got.tolist()}, expected {want.tolist()}"
        )


def sft_step(
    loaded: Any,
    samples: Sequence[Any],
    n_total: float,
    *,
    mask_mode: str = "compact",
    device: Any = "cpu",
    bf16: bool = False,
) -> StepResult:
    """Plain fine-tuning micro-step: ``sum_i loss_sum_i / n_total`` backward (originals only)."""
    if n_total <= 0:
        raise ValueError(f"total answer tokens must be > 0, got {n_total}")
    rows = [Copy(b, None, 1) for b in range(len(samples))]
    batch, keeps = _collate(loaded, samples, rows, mask_mode, device)
    loss_sum, n_tok = _forward(loaded, batch, device, bf16)
    (loss_sum.sum() / n_total).backward()
    n_ans = int(n_tok.sum())
    return StepResult(
        loss=float(loss_sum.detach().sum()) / max(1, n_ans),
        n_samples=len(samples),
        n_rows=len(rows),
        n_answer_tokens=n_ans,
        n_input_tokens=int(sum(int(k.sum()) for k in keeps)),
        rows=rows,
    )


def aimkp_step(
    loaded: Any,
    samples: Sequence[Any],
    indices: Sequence[int],
    strides: StrideTable,
    n_total: float,
    *,
    tau_text: float = 0.1,
    tau_image: float = 0.4,
    reduce: str = "mean",
    grand_threshold: float | None = None,
    mask_mode: str = "compact",
    device: Any = "cpu",
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
    model = loaded.model
    emb = loaded.adapter.embed_tokens
    if emb.weight.requires_grad and type(emb).__name__ != "MaskedEmbedding":
        raise ValueError(
            "aimkp_step: the input embedding is trainable but is a plain "
            f"{type(emb).__name__}, which the row forward bypasses (it calls the fused op on the "
            "weight directly), so the per-sample gradient engine would miss its per-row "
            "gradients; call aimkp.models.forward.use_masked_embedding_module(loaded) first "
            "(the training loop does) or freeze it"
        )
    rows = build_rows(samples, indices, strides)
    pairs = pairs_of(rows)
    w0 = provisional_weights(rows, n_total, reduce)
    orig_rows = torch.tensor([r for r, c in enumerate(rows) if c.kind is None], dtype=torch.long)
    need_gram = pairs.shape[0] > 0 or grand_threshold is not None
    batch, keeps = _collate(loaded, samples, rows, mask_mode, device)
    engine_backend = None
    if need_gram:
        cu = getattr(batch, "cu_seqlens", None)
        with per_sample_grad_gram(
            model,
            pairs=pairs.to(device) if pairs.shape[0] else None,
            cu_seqlens=cu,
            num_rows=len(rows),
            keep_for_reweight=True,
            module_rows=engine_module_rows(
                loaded, samples, rows, keeps if batch.mode == "compact" else None
            ),
        ) as gram:
            loss_sum, n_tok = _forward(loaded, batch, device, bf16)
            (loss_sum * w0.to(loss_sum.device, loss_sum.dtype)).sum().backward()
        engine_backend = getattr(gram, "backend", None)
        cos = gram.cosines if pairs.shape[0] else torch.zeros(0)
        orig_norms = None
        if grand_threshold is not None:
            # norms of the rows' weighted gradients -> norm of each original's mean-CE gradient
            n_i = torch.tensor([float(samples[rows[r].sample].n_answer_tokens) for r in orig_rows])
            orig_norms = gram.norms.detach().double().cpu()[orig_rows] / (w0[orig_rows] * n_i)
        decision = decide(
            rows,
            cos,
            n_total,
            tau_text=tau_text,
            tau_image=tau_image,
            reduce=reduce,
            grand_threshold=grand_threshold,
            orig_norms=orig_norms,
        )
        if not torch.allclose(decision.row_scale, torch.ones_like(decision.row_scale)):
            gram.reweight(decision.row_scale.to(device=loss_sum.device, dtype=torch.float32))
    else:
        loss_sum, n_tok = _forward(loaded, batch, device, bf16)
        (loss_sum * w0.to(loss_sum.device, loss_sum.dtype)).sum().backward()
        decision = decide(rows, torch.zeros(0), n_total, reduce=reduce)
    _check_tokens(samples, rows, n_tok)
    if update_strides:
        for b, i in enumerate(indices):
            strides.update(int(i), decision.text_passed[b], decision.image_passed[b])
    ls = loss_sum.detach().cpu()
    n_ans = int(n_tok.detach().cpu()[orig_rows].sum())
    return StepResult(
        loss=float(ls[orig_rows].sum()) / max(1, n_ans),
        n_samples=len(samples),
        n_rows=len(rows),
        n_answer_tokens=n_ans,
        n_input_tokens=int(sum(int(k.sum()) for k in keeps)),
        rows=rows,
        decision=decision,
        engine_backend=engine_backend,
    )
