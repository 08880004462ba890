"""AimKP in one file: a tiny LLaVA-style model, LoRA, the PMM stride table and a plain loop of
the AimKP step and AdamW on the default data (embedded in the package; nothing is downloaded).

Usage::

    python examples/minimal_aimkp.py                        # 64 posts, 3 epochs, a minute on a CPU
    python examples/minimal_aimkp.py --samples 8 --epochs 2 --batch-size 4     # a few seconds

Each micro-step (``aimkp.aimkp_step``) builds, per post, the original row plus a text-masked
and an image-masked copy when the post's PMM strides are above 1 (the first epoch has none:
every stride starts at 1 and doubles once a post is visited), runs ONE forward and ONE backward
over all rows under the per-sample gradient engine, rejects a copy whose gradient's cosine with
its original's is below ``tau_text`` / ``tau_image`` (Gradient-based Filtering) and reweights
``.grad`` to the kept copies' gradient. A kept copy doubles its stride (more tokens hidden next
time); a rejected one freezes it at its last accepted value.
``aimkp train`` runs the same step in a loop with checkpoints, resume and evaluation.
"""

from __future__ import annotations

import argparse
import time

import torch

import aimkp


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64, help="training posts of the default data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the LoRA weights")
    p.add_argument("--projector-lr", type=float, default=1e-3)
    p.add_argument("--tau-text", type=float, default=0.1, help="GF threshold of text copies")
    p.add_argument("--tau-image", type=float, default=0.4, help="GF threshold of image copies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # data: the embedded OpenClipart posts (image, text, keyphrases)
    records = aimkp.load_dataset("default", "train")[: args.samples]

    # model: the tiny-llava preset (random weights; its tokenizer is trained on these texts),
    # LoRA on the language model, the projector trained in full, the vision tower frozen
    texts = [r.text for r in records] + [", ".join(r.keyphrases) for r in records]
    loaded = aimkp.load_model("tiny-llava", train_texts=texts, seed=args.seed, device=device)
    aimkp.apply_lora(loaded, r=8, alpha=16, dropout=0.0, train_projector=True)
    model = loaded.model.train()
    samples = [loaded.adapter.encode(r) for r in records]  # token ids, image, answer span

    projector = {id(p) for p in loaded.adapter.projector.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if id(p) not in projector], "lr": args.lr},
            {"params": [p for p in trainable if id(p) in projector], "lr": args.projector_lr},
        ],
        weight_decay=0.0,
    )

    # the PMM schedule: one text stride and one image stride per post
    strides = aimkp.StrideTable(len(samples))
    opts = aimkp.StepOptions(tau_text=args.tau_text, tau_image=args.tau_image, device=device)

    last: dict[str, float] = {}
    for epoch in range(args.epochs):
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(epoch))
        loss_sum = answer_tokens = 0.0
        text = {"copies": 0, "kept": 0}
        image = {"copies": 0, "kept": 0}
        t0 = time.perf_counter()
        for start in range(0, len(samples), args.batch_size):
            idx = order[start : start + args.batch_size].tolist()
            batch = [samples[i] for i in idx]
            # every loss weight divides by the batch's answer tokens (the mean CE of the batch)
            n_total = float(sum(s.n_answer_tokens for s in batch))
            res = aimkp.aimkp_step(loaded, batch, idx, strides, n_total, opts)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            loss_sum += res.loss * res.n_answer_tokens
            answer_tokens += res.n_answer_tokens
            if res.decision is not None:  # None: no copy and no engine in this step
                text["copies"] += res.decision.num_text_copies
                text["kept"] += res.decision.text_kept
                image["copies"] += res.decision.num_image_copies
                image["kept"] += res.decision.image_kept
        last = {
            "loss": loss_sum / max(1.0, answer_tokens),
            "text_kept_rate": text["kept"] / max(1, text["copies"]),
            "image_kept_rate": image["kept"] / max(1, image["copies"]),
            "copies": text["copies"] + image["copies"],
        }
        print(
            f"epoch {epoch + 1}: loss {last['loss']:.3f}, "
            f"text copies kept {text['kept']}/{text['copies']}, "
            f"image copies kept {image['kept']}/{image['copies']}, "
            f"{time.perf_counter() - t0:.1f} s"
        )
    return last


if __name__ == "__main__":
    main()
