"""Score a prediction file against a source file.

  aimkp score --src test_src.txt --pred preds.txt [--protocol cmkp|aimkp] [--json]

SRC: any format the readers take (CMKP ``.txt``, AimKP ``.json``, ``.jsonl``); images are not read.
PRED: one line per post, keyphrases ranked, separated by ``;`` (or ``,`` when a line has no ``;``).
Prints F1@1/3/5, MAP@5, NDCG@5 in percent (and present/absent for cmkp); ``--json`` prints one JSON
object with those keys.
"""

from __future__ import annotations

import argparse
import json
import time

from aimkp.errors import DataError

HELP = "score ranked keyphrase predictions (CMKP or AimKP protocol)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="source/gold file (.txt CMKP, .json, .jsonl)")
    parser.add_argument("--pred", required=True, help="predictions, one line per post")
    parser.add_argument("--protocol", choices=["cmkp", "aimkp"], default="cmkp")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def format_table(res: dict) -> str:
    """A small text table of the headline metrics (and present/absent when present)."""
    from aimkp.metrics import HEADLINE

    cols = [c for c in HEADLINE if c in res]
    rows = [("all", res)]
    rows += [(k, res[k]) for k in ("present", "absent") if isinstance(res.get(k), dict)]
    head = f"{'':8} {'posts':>6} " + " ".join(f"{c:>7}" for c in cols)
    lines = [f"protocol: {res['protocol']}", head]
    for name, r in rows:
        vals = " ".join(f"{r.get(c, float('nan')):7.2f}" for c in cols)
        lines.append(f"{name:8} {r['n_posts']:>6} {vals}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from aimkp.data import read_records
    from aimkp.metrics import read_predictions, score

    t0 = time.perf_counter()
    recs = read_records(args.src, with_images=False)
    if recs.stats.total_skipped:
        raise DataError(
            f"{args.src}: {recs.stats.summary()}; lines would no longer align with "
            f"{args.pred}: remove them from both files"
        )
    preds = read_predictions(args.pred)
    if len(preds) != len(recs):
        raise DataError(
            f"line count mismatch: {args.pred} has {len(preds)} prediction lines but "
            f"{args.src} has {len(recs)} posts"
        )
    res = score(recs, preds, protocol=args.protocol)
    res["src"] = str(args.src)
    res["pred"] = str(args.pred)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    if args.json:
        print(json.dumps(res, sort_keys=False))
    else:
        print(format_table(res))
        print(f"({len(recs)} posts scored in {res['seconds']:.2f} s)")
    return 0
