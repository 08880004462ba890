"""The training loop of ``aimkp train``: one flat function you can read top to bottom.

Usage::

    aimkp train --preset tiny-llava --data default --output runs/demo --quick
    aimkp train --model /models/llava-1.5-7b-hf --data /data/cmkp --output runs/cmkp \\
        --epochs 4 --batch-size 8 --grad-accum 8 --bf16 --attn flash
    aimkp train ... --resume runs/cmkp            # continue exactly where it stopped

Per epoch: a seeded permutation of the training samples (seed + epoch, so resuming reproduces the
order); per optimizer step ``grad_accum`` micro-batches of ``batch_size`` samples, every loss weight
divided by the answer tokens of the whole accumulated batch; AimKP or SFT micro-steps
(:mod:`aimkp.train.step`); gradient clipping, AdamW (projector at its own lr), warm-up + cosine.
After each epoch: stride reconcile across ranks, greedy decoding on the validation split scored
with the CMKP protocol, best checkpoint by F1@1 + F1@3 + MAP@5 (``OUTPUT/best``), latest with the
full training state (``OUTPUT/last``), one row per epoch in ``OUTPUT/metrics.csv``.
"""

from __future__ import annotations

import csv
import logging
import math
import pathlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from aimkp.train.config import TrainConfig
from aimkp.train.pmm import StrideTable
from aimkp.train.state import (
    read_train_state,
    restore_train_state,
    save_train_state,
    trainable_state,
)
from aimkp.train.step import aimkp_step, autocast_ctx, sft_step

log = logging.getLogger("aimkp.train")

PROJECTOR_KEYS = ("multi_modal_projector", "mm_projector", "visual.merger", "model.connector.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """LambdaLR factor: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, projector: torch.nn.Module | None = None
) -> torch.optim.Optimizer:
    """AdamW; projector parameters at ``projector_lr``, everything else trainable at ``lr``.

    The projector is the adapter's module (``loaded.adapter.projector``) when given, else found
    by the known module names (LLaVA, Qwen2-VL, Idefics3)."""
    in_proj = {id(p) for p in projector.parameters()} if projector is not None else set()
    main, proj = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            is_proj = id(p) in in_proj or any(k in n for k in PROJECTOR_KEYS)
            (proj if is_proj else main).append(p)
    if not main and not proj:
        raise ValueError("the model has no trainable parameters")
    groups = []
    if main:
        groups.append({"params": main, "lr": cfg.lr})
    if proj:
        groups.append({"params": proj, "lr": cfg.projector_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def majority_keyphrases(records: Sequence[Any], k: int = 5) -> list[str]:
    """The ``k`` most frequent training keyphrases (ties broken by first appearance)."""
    c = Counter(kp for r in records for kp in dict.fromkeys(r.keyphrases))
    return [kp for kp, _ in c.most_common(k)]


def score_predictions(preds: list[list[str]], records: Sequence[Any]) -> dict[str, float]:
    """CMKP-protocol F1@1, F1@3, MAP@5 (percent) plus their sum ``score``."""
    from aimkp.metrics.cmkp import score_cmkp

    m = score_cmkp([r.text for r in records], [r.keyphrases for r in records], preds)
    out = {k: float(m[k]) for k in ("F1@1", "F1@3", "F1@5", "MAP@5") if k in m}
    out["score"] = out["F1@1"] + out["F1@3"] + out["MAP@5"]
    return out


def _eval_amp(cfg: TrainConfig, device: torch.device) -> bool | torch.dtype:
    """Autocast for decoding: a half frozen base computes with fp32 trainable weights."""
    from aimkp.models import precision as P

    return P.autocast_dtype(P.resolve_dtype(cfg.dtype, device), cfg.bf16)


def evaluate(loaded: Any, records: Sequence[Any], cfg: TrainConfig) -> dict[str, float]:
    """Greedy decoding on ``records`` and CMKP scores; the model is left in train mode."""
    from aimkp.eval.predict import Predictor

    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        pred = Predictor(loaded, decoding="greedy", max_new_tokens=cfg.max_new_tokens)
        with autocast_ctx(loaded.device, _eval_amp(cfg, loaded.device)):
            preds = pred.predict(list(records))
    finally:
        model.train(was_training)
    return score_predictions(preds, records)


def _write_metrics(path: pathlib.Path, history: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in history:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def _tb_writer(out: pathlib.Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(str(out / "tb"))


def _save_model(directory: pathlib.Path, loaded: Any, extra: dict[str, Any]) -> None:
    from aimkp.models.checkpoint import save_checkpoint

    save_checkpoint(directory, loaded, extra_json=extra)


def _backend_names(loaded: Any, engine_backend: str | None) -> dict[str, str]:
    """What actually ran in the last row forward (recorded by ``forward_rows``) and the engine."""
    fwd = loaded.info.get("last_forward", {})
    return {
        "row_mode": str(fwd.get("mode", "?")),
        "row_layout": str(fwd.get("layout", "?")),
        "attention": str(fwd.get("attention", loaded.info.get("attn", "?"))),
        **_varlen_kernel(loaded, fwd),
        "masked_embedding": f"{fwd.get('embedding', '?')} [{fwd.get('embedding_backend', '?')}]",
        "grad_engine": engine_backend or "- (no masked copies in this step)",
    }


def _varlen_kernel(loaded: Any, fwd: dict[str, Any]) -> dict[str, str]:
    """The varlen kernel behind packed rows (``--attn varlen`` / ``flash``), else nothing."""
    from aimkp.models.attention import kernel_name

    kernel = kernel_name(str(fwd.get("attention", loaded.info.get("attn", ""))))
    return {} if kernel is None else {"varlen_kernel": kernel}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; returns a summary dict (history, best score, paths)."""
    from tqdm.auto import tqdm

    from aimkp.data import load_dataset
    from aimkp.models import load_model
    from aimkp.models import precision as P
    from aimkp.models.forward import use_masked_embedding_module
    from aimkp.models.lora import apply_lora
    from aimkp.train import distributed as D

    cfg.validate()
    out = pathlib.Path(cfg.output)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = D.init_distributed(device)
    device = D.rank_device(ctx, device)
    main = ctx.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)

    # ---- data
    train_recs = list(load_dataset(cfg.data, "train"))[: cfg.max_train_samples]
    valid_recs = list(load_dataset(cfg.data, "valid"))[: cfg.eval_max_samples]
    if not train_recs:
        raise ValueError(f"dataset {cfg.data!r} has no training records")

    # ---- model
    dtype = torch.bfloat16 if (cfg.bf16 and device.type == "cuda" and cfg.full_finetune) else None
    loaded = load_model(
        cfg.model,
        train_texts=[r.text for r in train_recs] + [", ".join(r.keyphrases) for r in train_recs],
        attn=cfg.attn,
        device=device,
        seed=cfg.seed,
        dtype=dtype,
    )
    apply_lora(
        loaded,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        train_projector=True,
        full=cfg.full_finetune,
    )
    # frozen base in --dtype, trainable weights fp32; optional activation checkpointing
    amp = P.autocast_dtype(P.resolve_dtype(cfg.dtype, device), cfg.bf16)
    P.cast_frozen_base(loaded, P.resolve_dtype(cfg.dtype, device))
    if cfg.gradient_checkpointing:
        P.enable_gradient_checkpointing(loaded)
    model = loaded.model
    if cfg.full_finetune and cfg.freeze_embeddings:
        loaded.adapter.embed_tokens.weight.requires_grad_(False)
        log.info("full fine-tuning: input embedding frozen (--freeze-embeddings)")
    elif loaded.adapter.embed_tokens.weight.requires_grad:
        # the row forward then reads the table through the MaskedEmbedding module (same fused
        # op), whose calls the per-sample gradient engine hooks
        use_masked_embedding_module(loaded)
        log.info("input embedding trainable, read through aimkp.ops.MaskedEmbedding")
    if ctx.enabled:
        D.broadcast_trainable(model, ctx)
        torch.manual_seed(cfg.seed + 7919 * ctx.rank)  # own dropout masks per rank
    model.train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    samples = [loaded.adapter.encode(r) for r in train_recs]
    N = len(samples)
    strides = StrideTable(N) if cfg.method == "aimkp" else None

    mask_mode = cfg.resolved_mask_mode()
    log.info("row mode: %s (--mask-mode %s, attention %s)", mask_mode, cfg.mask_mode, cfg.attn)
    global_batch = cfg.effective_batch * ctx.world_size
    steps_per_epoch = math.ceil(N / global_batch)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    optimizer = build_optimizer(model, cfg, loaded.adapter.projector)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, warmup)
    )

    history: list[dict[str, Any]] = []
    best_score: float | None = None
    best_epoch: int | None = None
    start_epoch, step = 0, 0
    baseline_rows: dict[str, dict[str, float]] = {}
    if cfg.resume:
        st = read_train_state(cfg.resume)
        restore_train_state(
            st, model=model, optimizer=optimizer, scheduler=scheduler, strides=strides
        )
        start_epoch, step = int(st["epoch"]), int(st["step"])
        best_score, best_epoch = st["best_score"], st["best_epoch"]
        history = list(st["history"])
        log.info("resumed from %s at epoch %d, step %d", cfg.resume, start_epoch, step)
    elif cfg.baselines and main:
        test_recs = list(load_dataset(cfg.data, "test"))[: cfg.eval_max_samples]
        maj = majority_keyphrases(train_recs)
        baseline_rows["majority"] = score_predictions([list(maj) for _ in test_recs], test_recs)
        baseline_rows["untrained"] = evaluate(loaded, test_recs, cfg)
    if main:
        cfg.save(out / "config.json")

    log.info(
        "train: %s on %s, %d samples, %d trainable params, %d steps x %d samples "
        "(%d ranks), device %s, %d CPU threads",
        cfg.method,
        cfg.model,
        N,
        n_trainable,
        total_steps,
        global_batch,
        ctx.world_size,
        device,
        torch.get_num_threads(),
    )
    writer = _tb_writer(out) if main else None
    best_state: dict[str, torch.Tensor] | None = None
    last_epoch = (
        cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, cfg.stop_after_epochs)
    )
    logged_backends: bool | str = False
    for epoch in range(start_epoch, last_epoch):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        t0 = time.perf_counter()
        loss_sum = tok_ans = tok_in = 0.0
        n_txt = n_txt_kept = n_img = n_img_kept = n_pruned = 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not main,
        )
        for s in bar:
            # the same global batch on every rank; the loss divides by ITS answer tokens
            global_idx = perm[s * global_batch : (s + 1) * global_batch]
            n_total = float(sum(samples[i].n_answer_tokens for i in global_idx))
            idx = D.rank_share(global_idx, ctx)
            for m in range(0, len(idx), cfg.batch_size):
                mb = idx[m : m + cfg.batch_size]
                mb_samples = [samples[i] for i in mb]
                if strides is not None:
                    res = aimkp_step(
                        loaded,
                        mb_samples,
                        mb,
                        strides,
                        n_total,
                        tau_text=cfg.tau_text,
                        tau_image=cfg.tau_image,
                        reduce=cfg.gf_reduce,
                        grand_threshold=cfg.grand_threshold,
                        mask_mode=mask_mode,
                        device=device,
                        bf16=amp,
                    )
                    d = res.decision
                    n_txt += d.num_text_copies
                    n_txt_kept += d.text_kept
                    n_img += d.num_image_copies
                    n_img_kept += d.image_kept
                    n_pruned += int(d.pruned.sum())
                else:
                    res = sft_step(
                        loaded,
                        mb_samples,
                        n_total,
                        mask_mode=mask_mode,
                        device=device,
                        bf16=amp,
                    )
                loss_sum += res.loss * res.n_answer_tokens
                tok_ans += res.n_answer_tokens
                tok_in += res.n_input_tokens
                if not logged_backends or (
                    logged_backends == "no-engine" and res.engine_backend is not None
                ):
                    log.info("backends: %s", _backend_names(loaded, res.engine_backend))
                    logged_backends = "no-engine" if res.engine_backend is None else True
            D.all_reduce_grads(model.parameters(), ctx)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            bar.set_postfix(
                loss=f"{loss_sum / max(1.0, tok_ans):.3f}",
                tok_s=f"{tok_in / max(dt, 1e-9):.0f}",
                kept_t=f"{n_txt_kept}/{n_txt}",
                kept_v=f"{n_img_kept}/{n_img}",
            )
        bar.close()
        if strides is not None:
            strides.reconcile()
        dt = time.perf_counter() - t0
        if ctx.enabled:  # totals over the ranks
            (loss_sum, tok_ans, tok_in, n_txt, n_txt_kept, n_img, n_img_kept, n_pruned) = (
                D.all_reduce_sum(
                    [loss_sum, tok_ans, tok_in, n_txt, n_txt_kept, n_img, n_img_kept, n_pruned],
                    ctx,
                )
            )
            n_txt, n_img, n_pruned = int(n_txt), int(n_img), int(n_pruned)
            n_txt_kept, n_img_kept = int(n_txt_kept), int(n_img_kept)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_sum / max(1.0, tok_ans),
            "lr": scheduler.get_last_lr()[0],
            "epoch_s": dt,
            "samples_per_s": N / dt,
            "tokens_per_s": tok_in / dt,
            "text_copies": n_txt,
            "text_kept_rate": n_txt_kept / n_txt if n_txt else float("nan"),
            "image_copies": n_img,
            "image_kept_rate": n_img_kept / n_img if n_img else float("nan"),
            "grand_pruned": n_pruned,
        }
        if strides is not None:
            row.update(strides.summary())
        if not main:  # rank 0 evaluates, logs and writes; the others wait for it
            history.append(row)
            ctx.barrier()
            continue
        if cfg.eval_every_epoch and valid_recs:
            ev = evaluate(loaded, valid_recs, cfg)
            row.update({f"valid_{k}": v for k, v in ev.items()})
            if best_score is None or ev["score"] > best_score:
                best_score, best_epoch = ev["score"], epoch + 1
                best_state = trainable_state(model)
                _save_model(out / "best", loaded, {"epoch": epoch + 1, "valid": ev})
        history.append(row)
        _write_metrics(out / "metrics.csv", history)
        if writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    writer.add_scalar(k, v, epoch + 1)
        msg = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
        )
        log.info("epoch %d: %s", epoch + 1, msg)
        print(f"[aimkp train] {msg}", flush=True)
        _save_model(out / "last", loaded, {"epoch": epoch + 1})
        save_train_state(
            out / "last",
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            strides=strides,
            epoch=epoch + 1,
            step=step,
            best_score=best_score,
            best_epoch=best_epoch,
            history=history,
            config=cfg.to_dict(),
        )
        ctx.barrier()
    if writer is not None:
        writer.close()

    summary: dict[str, Any] = {
        "history": history,
        "best_score": best_score,
        "best_epoch": best_epoch,
        "output": str(out),
        "steps": step,
        "model": model,
        "loaded": loaded,
    }
    if baseline_rows and last_epoch == cfg.epochs:
        test_recs = list(load_dataset(cfg.data, "test"))[: cfg.eval_max_samples]
        if best_state is not None:
            from aimkp.train.state import load_trainable_state

            load_trainable_state(model, best_state)
        baseline_rows["trained (best)"] = evaluate(loaded, test_recs, cfg)
        summary["baselines"] = baseline_rows
        print_comparison(baseline_rows, len(test_recs))
        _write_metrics(out / "baselines.csv", [{"model": k, **v} for k, v in baseline_rows.items()])
    return summary


def print_comparison(rows: dict[str, dict[str, float]], n: int) -> None:
    """Print the test-split table: majority baseline, untrained and trained model."""
    cols = ["F1@1", "F1@3", "F1@5", "MAP@5", "score"]
    print(f"\nTest split ({n} posts), CMKP protocol, percent; score = F1@1 + F1@3 + MAP@5")
    print(f"{'model':<16}" + "".join(f"{c:>9}" for c in cols))
    for name, m in rows.items():
        print(f"{name:<16}" + "".join(f"{m.get(c, float('nan')):>9.2f}" for c in cols))
    tr = rows.get("trained (best)", {}).get("score")
    if tr is not None:
        beats = all(tr > rows[k]["score"] for k in ("majority", "untrained") if k in rows)
        print(f"trained model beats both baselines: {'yes' if beats else 'NO'}\n", flush=True)
