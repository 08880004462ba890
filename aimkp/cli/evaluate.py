"""Robustness evaluation of a trained checkpoint on clean and corrupted inputs.

  aimkp evaluate --checkpoint DIR --data SPEC --split test --output DIR
                 [--settings clean,text_only,...|all] [--max-samples N] [--protocol cmkp|aimkp]
                 [--seed 0] [--device cuda] [--decoding greedy] [--image-dir DIR]
                 [--on-missing-image error|skip] [--on-bad-record error|skip]

Writes OUTPUT/robustness.{json,md,png}. Scoring an existing prediction file is ``aimkp score``.
"""

from __future__ import annotations

import argparse
import sys

from aimkp.cli._common import add_read_arguments, check_device, check_output_dir, read_options
from aimkp.deps import require
from aimkp.runs.outdir import check_output_outside

HELP = "robustness report (clean, text-only, image-only, noisy, misaligned) for a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint (LoRA adapter, full or merged export)"
    )
    parser.add_argument(
        "--data", default="default", help="'default', 'synthetic[:seed]', file/dir, hf:DIR"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", required=True, help="report directory")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="setting names (comma or space separated) or 'all'; default: the standard eight",
    )
    parser.add_argument("--max-samples", type=int, default=None, help="first N records only")
    parser.add_argument("--protocol", choices=["cmkp", "aimkp"], default="cmkp")
    parser.add_argument("--seed", type=int, default=0, help="corruption seed")
    parser.add_argument("--device", default=None)
    parser.add_argument("--decoding", default="greedy")
    add_read_arguments(parser)
    parser.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace) -> int:
    from aimkp.data import Record, load_dataset
    from aimkp.eval.predict import GenerationOptions, Predictor
    from aimkp.eval.robustness import markdown_table, resolve_settings, run_robustness
    from aimkp.models import check_model_spec, load_model

    check_output_dir(args.output, "--output")
    check_output_outside(args.output, args.checkpoint, "--output")
    if not args.no_plot:  # the plot comes last: its package is checked before any decoding
        require("matplotlib", "--no-plot", purpose="robustness.png")
    check_device(args.device)
    check_model_spec(args.checkpoint)
    settings = resolve_settings(args.settings)
    generation = GenerationOptions(decoding=args.decoding)  # checked before any work
    dataset = load_dataset(args.data, args.split, **read_options(args, args.data))
    print(dataset.stats.summary(), file=sys.stderr)
    records: list[Record] = dataset  # a slice of a RecordList is a plain list
    if args.max_samples is not None:
        records = dataset[: args.max_samples]
    from aimkp.eval.hidden import predict_fn_for

    loaded = load_model(args.checkpoint, device=args.device)
    predictor = Predictor(loaded, generation, device=args.device)
    res = run_robustness(
        predict_fn_for(predictor),
        records,
        settings=settings,
        out_dir=args.output,
        seed=args.seed,
        protocol=args.protocol,
        plot=not args.no_plot,
    )
    print(markdown_table(res))
    print("wrote " + ", ".join(res["files"].values()))
    return 0
