"""Compare AimKP with plain fine-tuning (and variants) over seeds, with intervals.

  aimkp compare --data default --preset tiny-llava --quick --methods sft,aimkp,aimkp:gf_reduce=sum
                --seeds 3 --epochs 4 --max-train-samples 1200 --budget epochs --output runs/cmp

Every method x seed is trained (same initial weights and data order per seed), its best
checkpoint evaluated on the robustness settings, and OUTPUT/compare.{json,md,png} written:
mean and 95% t-interval over seeds, and a paired bootstrap over test posts of each method's
difference to the first. Rerun the same command to resume: finished runs are not trained again,
and a run that was stopped continues from its last checkpoint (written every ``--save-every``
optimizer steps, default 20, and at every epoch's end).
A variant is METHOD:FIELD=VALUE,... with TrainConfig fields (``aimkp:lr=1e-3,tau_text=0.3``).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

from aimkp.deps import require
from aimkp.errors import UsageError

# optimizer steps between step checkpoints: what a killed comparison loses at most per run
SAVE_EVERY = 20
HELP = "compare methods (sft, aimkp, variants) over seeds with t-intervals and a paired bootstrap"

# pass-through training options: flag -> TrainConfig field (None = not given)
_PASS = {
    "max_train_samples": int,
    "eval_max_samples": int,
    "batch_size": int,
    "lr": float,
    "projector_lr": float,
    "lora_r": int,
    "lora_alpha": int,
    "save_every": int,
    "max_new_tokens": int,
    "threads": int,
    "device": str,
    "mask_mode": str,
    "attn": str,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="default", help="dataset spec (default, synthetic-split:SEED)")
    p.add_argument("--model", "--preset", dest="model", default="tiny-llava")
    p.add_argument("--methods", default="sft,aimkp", help="comma list; the first is the reference")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--epochs", type=int, default=None, help="default: 4, or 5 with --quick")
    p.add_argument("--budget", choices=("epochs", "tokens"), default="epochs")
    p.add_argument(
        "--settings",
        default=None,
        help="robustness settings, comma-separated (default: clean, text_only, image_only, "
        "text_hidden, image_hidden, misaligned)",
    )
    p.add_argument("--output", required=True, help="comparison directory")
    p.add_argument("--quick", action="store_true", help="the demo's training settings")
    p.add_argument("--full-finetune", action="store_true", default=None)
    for name, typ in _PASS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")


def base_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Shared TrainConfig fields: the defaults, ``--quick``'s, then the flags given."""
    from aimkp.train.config import TrainConfig

    fields: dict[str, Any] = {"model": args.model, "data": args.data, "save_every": SAVE_EVERY}
    if args.quick:
        fields.update(TrainConfig.quick_overrides())
    given = {k: getattr(args, k) for k in _PASS if getattr(args, k) is not None}
    if "threads" in given:
        given["num_threads"] = given.pop("threads")
    if args.full_finetune:
        given["full_finetune"] = True
    fields.update(given)
    return fields


def build_spec(args: argparse.Namespace, argv: list[str] | None = None) -> Any:
    from aimkp.compare.methods import parse_methods
    from aimkp.compare.run import DEFAULT_SETTINGS, CompareSpec
    from aimkp.eval.robustness import resolve_settings
    from aimkp.train.config import TrainConfig

    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    base = base_fields(args)
    epochs = args.epochs or base.pop("epochs", TrainConfig().epochs)
    base.pop("epochs", None)
    argv = sys.argv[1:] if argv is None else argv
    return CompareSpec(
        methods=parse_methods(args.methods),
        seeds=list(range(args.seeds)),
        settings=resolve_settings(args.settings or ",".join(DEFAULT_SETTINGS)),
        base=base,
        epochs=epochs,
        budget=args.budget,
        output=args.output,
        n_boot=args.bootstrap,
        boot_seed=args.bootstrap_seed,
        plot=not args.no_plot,
        command="aimkp " + shlex.join(argv),
    )


def check_method_options(spec: Any, given: set[str]) -> None:
    """The options-consistency check of every method's training config, before any training:
    a contradiction refused, an option that changes nothing (``sft:tau_text=0.3``) warned once
    per method (``given``: the training flags set on the command line)."""
    import torch  # imported here, as in run(): parsing the command loads no torch

    from aimkp.compare.run import run_config

    device = spec.base.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    for m in spec.methods:
        cfg = run_config(spec, m, spec.seeds[0], spec.epochs)
        set_by_user = given | set(m.options) | {"method"}
        for warning in cfg.check_consistency(torch.device(device).type, set_by_user):
            logging.getLogger("aimkp.compare").warning("%s: %s", m.label, warning)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from aimkp.compare.run import check_spec, run_all
    from aimkp.data import load_dataset
    from aimkp.eval import compare_report

    spec = build_spec(args, argv)
    if spec.plot:  # the plot comes last, after every run: its package is checked first
        require("matplotlib", "--no-plot", purpose="compare.png")
    check_spec(spec)
    check_method_options(spec, {k for k in _PASS if getattr(args, k) is not None})
    results = run_all(spec)
    test = list(load_dataset(spec.base["data"], "test"))[: spec.base.get("eval_max_samples")]
    rep = compare_report.build_report(spec, results, test)
    files = compare_report.write(rep, spec.output, with_plot=spec.plot)
    print(compare_report.markdown(rep))
    print("wrote " + ", ".join(files))
    return 0
