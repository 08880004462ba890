"""Predict keyphrases with a trained checkpoint.

aimkp predict --checkpoint DIR --data SPEC [--split test] --out FILE
              [--decoding greedy|beam|sample] [--num-beams 4] [--max-new-tokens 32]
              [--temperature 1.0] [--top-p 1.0] [--seed 0] [--batch-size 8]
              [--modality multimodal|text|image] [--device cpu|cuda] [--limit N]

Writes one line per record, in dataset order: its ranked keyphrases joined by ";" (an empty line
when nothing was predicted): the file ``aimkp score`` reads.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

HELP = "generate keyphrases for a dataset split with a trained checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from aimkp.eval.predict import DECODINGS, MODALITIES

    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory (LoRA adapter, full or merged export) or a cached hub id",
    )
    parser.add_argument("--data", default="default", help="dataset spec (default: default)")
    parser.add_argument("--split", default="test", help="split (default: test)")
    parser.add_argument("--out", required=True, help="output file, one line per record")
    parser.add_argument("--decoding", choices=DECODINGS, default="greedy")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modality", choices=MODALITIES, default="multimodal")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")


def run(args: argparse.Namespace) -> int:
    try:
        return _predict(args)
    except (ValueError, OSError) as exc:  # bad data, a missing or unreadable checkpoint
        print(f"aimkp predict: error: {exc}", file=sys.stderr)
        return 2


def _predict(args: argparse.Namespace) -> int:
    import torch

    from aimkp.data import load_dataset
    from aimkp.eval.predict import load_predictor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    records = load_dataset(args.data, args.split)
    if args.limit is not None:
        records = records[: args.limit]
    pred = load_predictor(
        args.checkpoint,
        device=device,
        decoding=args.decoding,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        modality=args.modality,
    )
    t0 = time.perf_counter()
    kps = pred.predict(records)
    dt = time.perf_counter() - t0
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for k in kps:
            f.write(";".join(k) + "\n")
    print(
        f"predicted {len(kps)} records ({args.decoding}, {args.modality}, {device}) in "
        f"{dt:.1f}s -> {out}",
        file=sys.stderr,
    )
    return 0
