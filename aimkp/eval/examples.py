"""A few posts with their true and predicted keyphrases, for reading a model's output by eye
(``make demo-smol`` prints them after the robustness table).

  python -m aimkp.eval.examples --predictions runs/demo/eval/predictions/clean.txt \\
      --data default --split test -n 5
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from aimkp.data import load_dataset
from aimkp.errors import UsageError
from aimkp.metrics import read_predictions


def format_examples(
    records: Sequence[Any], predictions: Sequence[Sequence[str]], n: int, width: int = 70
) -> str:
    """The first ``n`` posts that have a prediction (a prediction file may cover the first posts
    of a split only): text (cut at ``width``), true and predicted keyphrases, and which predicted
    ones are right."""
    if len(predictions) > len(records):
        raise UsageError(
            f"{len(predictions)} prediction lines for a split of {len(records)} posts: the "
            "predictions belong to another split"
        )
    lines = []
    for rec, pred in list(zip(records, predictions))[:n]:
        text = " ".join((rec.text or "").split())
        text = text if len(text) <= width else text[: width - 3] + "..."
        truth = {k.lower() for k in rec.keyphrases}
        marked = [f"{p} [ok]" if p.lower() in truth else p for p in pred]
        lines += [
            f"post {rec.id}: {text!r}" + ("" if rec.image_path or rec.image else " (no image)"),
            f"  true:      {', '.join(rec.keyphrases)}",
            f"  predicted: {', '.join(marked) or '(nothing)'}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aimkp.eval.examples", description=__doc__)
    p.add_argument("--predictions", required=True, help="a prediction file (one line per post)")
    p.add_argument("--data", default="default")
    p.add_argument("--split", default="test")
    p.add_argument("-n", type=int, default=5, help="posts to show")
    args = p.parse_args(argv)
    try:
        records = load_dataset(args.data, args.split)
        print(format_examples(records, read_predictions(args.predictions), args.n))
    except UsageError as exc:
        print(f"examples: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
