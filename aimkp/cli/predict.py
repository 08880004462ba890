"""Predict keyphrases with a trained checkpoint, streaming and resumable.

aimkp predict --checkpoint DIR --data SPEC [--split test] --out FILE [--resume | --overwrite]
              [--decoding greedy|beam|sample] [--num-beams 4] [--max-new-tokens 32]
              [--temperature 1.0] [--top-p 1.0] [--seed 0] [--batch-size 8] [--sort-window N]
              [--modality multimodal|text|image] [--device cpu|cuda] [--limit N]
              [--image-dir DIR] [--on-missing-image error|skip] [--on-bad-record error|skip]

Posts are read lazily and predictions written as each batch finishes (flushed, whole lines):
``FILE.jsonl`` gets one ``{"id", "keyphrases", "generation"}`` object per post; any other
suffix one line per post in input order, its ranked keyphrases joined by ";" (an empty line when
nothing was predicted): the file ``aimkp score`` reads. Posts need no keyphrases.

An existing non-empty FILE is refused unless ``--resume`` (``.jsonl`` only: posts already written
are skipped by id, a torn last line is cut) or ``--overwrite``. A post that cannot be read or
predicted (malformed, too long for the model's context, a duplicate id) stops the run with its
``file:line``, or with ``--on-bad-record skip`` is skipped, logged with its ``file:line`` and
counted. The last line says how many posts were predicted, skipped and resumed. Skipped posts
have no line, so such a ``;`` file no longer aligns with the source file for ``aimkp score``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

import torch

from aimkp.cli._common import add_read_arguments, check_device, check_output_file, read_options
from aimkp.data.lazy import iter_posts
from aimkp.data.record import ReadStats
from aimkp.errors import UsageError
from aimkp.eval.predict import DECODINGS, MODALITIES, GenerationOptions, Predictor
from aimkp.eval.streaming import claim_output, open_writer, predict_stream, summary
from aimkp.runs.outdir import check_output_outside

HELP = "generate keyphrases for a dataset split with a trained checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory (LoRA adapter, full or merged export) or a cached hub id",
    )
    parser.add_argument("--data", default="default", help="dataset spec (default: default)")
    parser.add_argument("--split", default="test", help="split (default: test)")
    parser.add_argument(
        "--out", required=True, help="output file: .jsonl (with ids, resumable) or ';' lines"
    )
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument(
        "--resume", action="store_true", help="continue a .jsonl output: skip the ids in it"
    )
    policy.add_argument("--overwrite", action="store_true", help="replace an existing output")
    gen = GenerationOptions()  # the flags' defaults are the options' own
    parser.add_argument("--decoding", choices=DECODINGS, default=gen.decoding)
    parser.add_argument("--num-beams", type=int, default=gen.num_beams)
    parser.add_argument("--max-new-tokens", type=int, default=gen.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=gen.temperature)
    parser.add_argument("--top-p", type=float, default=gen.top_p)
    parser.add_argument("--seed", type=int, default=gen.seed)
    parser.add_argument("--batch-size", type=int, default=gen.batch_size)
    parser.add_argument(
        "--sort-window",
        type=int,
        default=None,
        help="posts read and sorted by length together (default: 8 x --batch-size)",
    )
    parser.add_argument("--modality", choices=MODALITIES, default=gen.modality)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    add_read_arguments(parser)


def _generation_options(args: argparse.Namespace) -> GenerationOptions:
    """:class:`Predictor`'s options from the flags (each named as its field), checked."""
    options = GenerationOptions(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationOptions)}
    )
    if args.limit is not None and args.limit < 0:
        raise UsageError(f"--limit must be >= 0, got {args.limit}")
    if args.sort_window is not None and args.sort_window < 1:
        raise UsageError(f"--sort-window must be >= 1, got {args.sort_window}")
    return options


def run(args: argparse.Namespace) -> int:
    # imported here: `aimkp --help` builds every subcommand's parser and needs no transformers
    from tqdm import tqdm

    from aimkp.models import check_model_spec, load_model

    out = check_output_file(args.out, "--out")
    check_output_outside(out, args.checkpoint, "--out")
    check_device(args.device)
    options = _generation_options(args)
    check_model_spec(args.checkpoint)
    plan = claim_output(out, resume=args.resume, overwrite=args.overwrite)
    stats = ReadStats()
    posts = iter_posts(args.data, args.split, stats=stats, **read_options(args, args.data))
    if args.limit is not None:
        posts = itertools.islice(posts, args.limit)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pred = Predictor(load_model(args.checkpoint, device=device), options, device=device)
    try:
        with (
            open_writer(plan) as writer,
            tqdm(unit="post", file=sys.stderr, disable=None, smoothing=0.1) as bar,
        ):
            counts = predict_stream(
                pred,
                posts,
                writer,
                done_ids=plan.done_ids,
                window=args.sort_window,
                on_bad_record=args.on_bad_record,
                progress=bar,
            )
    except KeyboardInterrupt:  # Ctrl-C: every batch written so far is in the file, whole
        again = "--resume" if plan.jsonl else "--overwrite (a ';' file cannot be resumed)"
        print(f"aimkp predict: interrupted; rerun with {again} to finish {out}", file=sys.stderr)
        return 130
    print(summary(counts, stats, out), file=sys.stderr)
    return 0
