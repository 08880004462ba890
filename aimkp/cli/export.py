"""Export a checkpoint as one standard Hugging Face model directory, LoRA merged.

aimkp export --checkpoint DIR --output OUT [--dtype float32|bfloat16|float16]

DIR is a LoRA adapter checkpoint (peft format: ``adapter_config.json`` naming its base), a full
checkpoint or a local HF directory. OUT gets ``config.json`` + ``model.safetensors`` (the adapter
merged into its base with peft's ``merge_and_unload``), the tokenizer, image processor and the
architecture's processor: ``AutoModelForImageTextToText.from_pretrained(OUT)`` and
``AutoProcessor.from_pretrained(OUT)`` load it without aimkp or peft.
"""

from __future__ import annotations

import argparse
import sys

from aimkp.cli._common import check_output_dir
from aimkp.errors import UsageError
from aimkp.runs.outdir import check_new_model_dir

HELP = "write a checkpoint as a standard HF model directory (LoRA merged)"
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="adapter or full checkpoint directory")
    parser.add_argument("--output", required=True, help="directory to write the merged model to")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="weight dtype (default: the checkpoint's)"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from aimkp.models import check_model_spec
    from aimkp.models.peft_io import export_merged

    check_output_dir(args.output, "--output")
    check_new_model_dir(args.output, args.checkpoint)
    check_model_spec(args.checkpoint)  # a truncated or mismatched checkpoint named before work
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        out = export_merged(args.checkpoint, args.output, dtype=dtype)
    except OSError as exc:  # unreadable checkpoint files, a full disk
        raise UsageError(f"cannot export {args.checkpoint}: {exc}") from exc
    print(f"exported {args.checkpoint} -> {out} (merged, full weights)", file=sys.stderr)
    return 0
