"""Robustness evaluation of a trained checkpoint on clean and corrupted inputs.

  aimkp evaluate --checkpoint DIR --data SPEC --split test --output DIR
                 [--settings clean,text_only,...|all] [--max-samples N] [--protocol cmkp|aimkp]
                 [--seed 0] [--device cuda] [--decoding greedy]

Writes OUTPUT/robustness.{json,md,png}. Scoring an existing prediction file is ``aimkp score``.
"""

from __future__ import annotations

import argparse
import sys

HELP = "robustness report (clean, text-only, image-only, noisy, misaligned) for a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--data", default="default", help="'default', 'synthetic[:seed]', file/dir")
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
    parser.add_argument("--image-dir", default=None)
    parser.add_argument("--on-missing-image", choices=["error", "skip"], default="error")
    parser.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace) -> int:
    from aimkp.data import load_dataset
    from aimkp.eval.robustness import markdown_table, resolve_settings, run_robustness

    try:
        settings = resolve_settings(args.settings)
        kw = {}
        if not args.data.startswith("synthetic"):
            kw = {"image_dir": args.image_dir, "on_missing_image": args.on_missing_image}
        records = load_dataset(args.data, args.split, **kw)
        print(records.stats.summary(), file=sys.stderr)
        if args.max_samples is not None:
            records = records[: args.max_samples]
        try:
            from aimkp.eval.predict import load_predictor
        except ImportError as exc:
            raise ValueError(
                "aimkp.eval.predict.load_predictor is not available in this installation "
                f"({exc}); score existing predictions with `aimkp score` instead"
            ) from exc
        from aimkp.eval.hidden import predict_fn_for

        predictor = load_predictor(args.checkpoint, device=args.device, decoding=args.decoding)
        res = run_robustness(
            predict_fn_for(predictor),
            records,
            settings=settings,
            out_dir=args.output,
            seed=args.seed,
            protocol=args.protocol,
            plot=not args.no_plot,
        )
    except (ValueError, OSError) as exc:
        print(f"aimkp evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(res))
    print("wrote " + ", ".join(res["files"].values()))
    return 0
