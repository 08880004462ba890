"""Export a checkpoint as a standard Hugging Face model directory, or for a serving engine.

aimkp export --checkpoint DIR --output OUT [--format merged|vllm]
             [--dtype float32|bfloat16|float16]

DIR is a LoRA adapter checkpoint (peft format: ``adapter_config.json`` naming its base), a full
checkpoint or a local HF directory. OUT gets ``config.json`` + ``model.safetensors`` (the adapter
merged into its base with peft's ``merge_and_unload``), the tokenizer, image processor and the
architecture's processor: ``AutoModelForImageTextToText.from_pretrained(OUT)`` and
``AutoProcessor.from_pretrained(OUT)`` load it without aimkp or peft.

``--format vllm`` writes ``OUT/base`` (the base model with the trained projector in place, its
processor) and ``OUT/adapter`` (the language-model LoRA as a peft adapter under the Hugging Face
module names, no ``modules_to_save``): ``vllm serve OUT/base --enable-lora --lora-modules
aimkp=OUT/adapter`` (see docs/prediction.md). ``--dtype`` applies to ``merged`` only.
"""

from __future__ import annotations

import argparse
import sys

from aimkp.cli._common import check_output_dir
from aimkp.errors import UsageError
from aimkp.runs.outdir import check_new_model_dir

HELP = "write a checkpoint as a standard HF model directory (LoRA merged) or for vLLM"
DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("merged", "vllm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="adapter or full checkpoint directory")
    parser.add_argument("--output", required=True, help="directory to write the merged model to")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="merged",
        help="merged: one HF directory, LoRA merged (default); vllm: base + LoRA adapter",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="weight dtype (default: the checkpoint's)"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from aimkp.models import check_model_spec
    from aimkp.models.peft_io import export_merged

    if args.format == "vllm" and args.dtype:  # an argument error, named before any check of paths
        raise UsageError("--dtype applies to --format merged; vLLM picks its dtype (--dtype)")
    check_output_dir(args.output, "--output")
    check_new_model_dir(args.output, args.checkpoint)
    check_model_spec(args.checkpoint)  # a truncated or mismatched checkpoint named before work
    if args.format == "vllm":
        return _export_vllm(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        out = export_merged(args.checkpoint, args.output, dtype=dtype)
    except OSError as exc:  # unreadable checkpoint files, a full disk
        raise UsageError(f"cannot export {args.checkpoint}: {exc}") from exc
    print(f"exported {args.checkpoint} -> {out} (merged, full weights)", file=sys.stderr)
    return 0


def _export_vllm(args: argparse.Namespace) -> int:
    from aimkp.models.serving_export import export_for_serving

    try:
        base, adapter = export_for_serving(args.checkpoint, args.output)
    except OSError as exc:  # unreadable checkpoint files, a full disk
        raise UsageError(f"cannot export {args.checkpoint}: {exc}") from exc
    if adapter is None:
        print(f"exported {args.checkpoint} -> {base} (full weights, no LoRA)", file=sys.stderr)
    else:
        print(f"exported {args.checkpoint} -> {base} + LoRA adapter {adapter}", file=sys.stderr)
    return 0
