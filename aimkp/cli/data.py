"""Data tools.

aimkp data build-openclipart --out DIR [--size 96] [--max N] [--min-freq 5] [--seed 0]
    render Debian's openclipart-svg into an MKP dataset (train/valid/test JSONL + PNGs)
aimkp data info --data SPEC [--split test] [--on-missing-image skip] [--on-bad-record skip]
    read a dataset (images decoded in full) and say how many records were read / skipped and why
aimkp data convert --data SPEC --split S --out FILE.jsonl
    write any readable dataset as generic JSONL
aimkp data convert --to hf --data SPEC [--split train,valid,test] --out DIR
    write its splits as a Hugging Face DatasetDict (save_to_disk, images embedded; valid is
    stored as validation), readable as --data hf:DIR
"""

from __future__ import annotations

import argparse
import collections
import json

from aimkp.cli._common import (
    add_read_arguments,
    add_verbose,
    check_output_dir,
    check_output_file,
    read_options,
)
from aimkp.runs.outdir import check_new_dir, check_not_an_input

HELP = "build the openclipart dataset, inspect or convert datasets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = sub.add_parser("build-openclipart", help="render openclipart-svg into an MKP dataset")
    add_verbose(b)
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--root", default=None, help="SVG root (default /usr/share/openclipart/svg)")
    b.add_argument("--size", type=int, default=96, help="PNG side in pixels (default 96)")
    b.add_argument("--max", type=int, default=None, help="at most N records in total")
    b.add_argument("--valid", type=int, default=250, help="valid split size (default 250)")
    b.add_argument("--test", type=int, default=250, help="test split size (default 250)")
    b.add_argument(
        "--min-freq",
        type=int,
        default=5,
        help="N: keep drawings with a keyphrase that occurs in >= N drawings (default 5)",
    )
    b.add_argument(
        "--max-per-tagset",
        type=int,
        default=25,
        help="at most this many drawings with one identical keyphrase set",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--workers", type=int, default=None)

    i = sub.add_parser("info", help="read a dataset and report counts")
    add_verbose(i)
    i.add_argument("--data", required=True, help="'default', 'synthetic[:seed]', file or dir")
    i.add_argument("--split", default="test")
    add_read_arguments(i)
    i.add_argument("--no-images", action="store_true", help="ignore the image field")

    c = sub.add_parser("convert", help="write a dataset as generic JSONL or a HF DatasetDict")
    add_verbose(c)
    c.add_argument("--data", required=True)
    c.add_argument(
        "--split",
        default=None,
        help="split (default test); with --to hf comma-separated splits (default train,valid,test)",
    )
    c.add_argument("--to", choices=["jsonl", "hf"], default="jsonl", help="output format")
    c.add_argument("--out", required=True, help="JSONL file, or directory with --to hf")
    add_read_arguments(c)
    c.add_argument("--no-images", action="store_true")


def _load(args: argparse.Namespace, split: str | None = None):  # noqa: ANN202 - RecordList
    from aimkp.data import load_dataset

    return load_dataset(
        args.data,
        split or args.split or "test",
        **read_options(args, args.data, with_images=not args.no_images),
    )


def _convert_to_hf(args: argparse.Namespace) -> int:
    from aimkp.data.hf import save_hf

    names = [s.strip() for s in (args.split or "train,valid,test").split(",") if s.strip()]
    splits = {name: _load(args, name) for name in names}
    save_hf(splits, args.out)
    counts = ", ".join(f"{name} {len(recs)}" for name, recs in splits.items())
    print(f"wrote a DatasetDict ({counts} records) to {args.out}; read it as --data hf:{args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.data_command == "build-openclipart":
        return _build_openclipart(args)
    if args.data_command == "convert" and args.to == "hf":
        check_output_dir(args.out, "--out")
        check_new_dir(args.out, "--out", "the DatasetDict")
        check_not_an_input(args.out, [args.data.removeprefix("hf:")], "--out")
        return _convert_to_hf(args)
    if args.data_command == "convert":
        check_output_file(args.out, "--out")
        check_not_an_input(args.out, [args.data.removeprefix("hf:")], "--out")
    recs = _load(args)
    if args.data_command == "info":
        print(recs.stats.summary())
        kp = collections.Counter(k for r in recs for k in r.keyphrases)
        n = max(len(recs), 1)
        print(
            f"records {len(recs)}; with image {sum(r.has_image for r in recs)}; "
            f"keyphrases/record {sum(len(r.keyphrases) for r in recs) / n:.2f}; "
            f"distinct keyphrases {len(kp)}"
        )
        print("most common:", ", ".join(f"{k} ({c})" for k, c in kp.most_common(10)))
        return 0
    if args.data_command == "convert":
        from aimkp.data import write_jsonl
        from aimkp.data.hf import write_embedded_images

        write_jsonl(write_embedded_images(recs, args.out), args.out)
        print(f"{recs.stats.summary()}; wrote {len(recs)} records to {args.out}")
        return 0
    raise AssertionError(args.data_command)


def _build_openclipart(args: argparse.Namespace) -> int:
    from aimkp.data import openclipart

    check_output_dir(args.out, "--out")
    stats = openclipart.build(
        args.out,
        root=args.root or openclipart.DEFAULT_ROOT,
        size=args.size,
        max_records=args.max,
        n_valid=args.valid,
        n_test=args.test,
        min_freq=args.min_freq,
        max_per_tagset=args.max_per_tagset,
        seed=args.seed,
        workers=args.workers,
    )
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0
