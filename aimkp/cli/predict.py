"""Predict keyphrases with a trained checkpoint.

aimkp predict --checkpoint DIR --data SPEC [--split test] --out FILE
              [--decoding greedy|beam|sample] [--num-beams 4] [--max-new-tokens 32]
              [--temperature 1.0] [--top-p 1.0] [--seed 0] [--batch-size 8]
              [--modality multimodal|text|image] [--device cpu|cuda] [--limit N]
              [--image-dir DIR] [--on-missing-image error|skip] [--on-bad-record error|skip]

Writes one line per record, in dataset order: its ranked keyphrases joined by ";" (an empty line
when nothing was predicted): the file ``aimkp score`` reads. Posts skipped while reading (with
``--on-missing-image skip`` / ``--on-bad-record skip``) are counted on stderr and have no line,
so such an output no longer aligns with the source file for ``aimkp score``.
"""

from __future__ import annotations

import argparse
import sys
import time

from aimkp.cli._common import add_read_arguments, check_device, check_output_file, read_options
from aimkp.errors import UsageError

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
    add_read_arguments(parser)


def run(args: argparse.Namespace) -> int:
    out = check_output_file(args.out, "--out")
    check_device(args.device)
    if args.limit is not None and args.limit < 0:
        raise UsageError(f"--limit must be >= 0, got {args.limit}")
    import torch

    from aimkp.data import load_dataset
    from aimkp.eval.predict import Predictor
    from aimkp.models import check_model_spec, load_model

    check_model_spec(args.checkpoint)
    options = {
        "decoding": args.decoding,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "modality": args.modality,
    }
    Predictor.check_options(**options)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    records = load_dataset(args.data, args.split, **read_options(args, args.data))
    print(records.stats.summary(), file=sys.stderr)
    if args.limit is not None:
        records = records[: args.limit]
    pred = Predictor(load_model(args.checkpoint, device=device), device=device, **options)
    t0 = time.perf_counter()
    kps = pred.predict(records)
    dt = time.perf_counter() - t0
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
