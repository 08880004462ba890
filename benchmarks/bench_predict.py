"""Benchmark: posts/s of streaming prediction (``aimkp predict``'s code path) by batch size.

For each batch size (default 1, 8, 32) the same posts of the committed dataset's test split are
predicted with greedy decoding through :func:`aimkp.eval.streaming.predict_stream` into a JSONL
file, as ``aimkp predict --out F.jsonl`` does: posts read lazily, encoded (images preprocessed
once) a window at a time, sorted by prompt length inside the window, left-padded batches,
KV cache. Rows report the model load, the prediction time, posts/s without and with the load,
and, for batches > 1, the same run with no length sorting across batches (``--sort-window``
equal to the batch size: batches in input order) to show what the sorting buys.

    .venv/bin/python -m benchmarks.bench_predict                     # tiny-llava, 64 posts
    .venv/bin/python -m benchmarks.bench_predict --posts 16 --quick  # fewer posts, 1 repeat

Writes ``benchmarks/results/predict_<model>-<device>.json``. The tiny presets have random
weights: they never emit eos, so every post generates exactly ``--max-new-tokens`` tokens (the
worst case for a trained model, whose answers stop early). Timing: 1 torch thread on the CPU
unless ``--threads`` says otherwise; repeats are interleaved across configurations and the
median is reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from aimkp.data.lazy import iter_posts
from aimkp.eval.predict import Predictor
from aimkp.eval.streaming import JsonlWriter, predict_stream
from aimkp.models import load_model
from benchmarks.common import env_info, print_table, results_dir


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llava", help="preset or checkpoint directory")
    p.add_argument("--data", default="default")
    p.add_argument("--split", default="test")
    p.add_argument("--posts", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 repeat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--note", default="", help="measuring conditions, kept in every row")
    p.add_argument("--out", default=None, help="result file (default: results/predict_*.json)")
    return p.parse_args(argv)


def _load_seconds(args: argparse.Namespace) -> tuple[Any, float]:
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device)
    return loaded, time.perf_counter() - t0


def _run_once(loaded: Any, args: argparse.Namespace, batch: int, window: int) -> dict[str, Any]:
    pred = Predictor(
        loaded, batch_size=batch, max_new_tokens=args.max_new_tokens, device=args.device
    )
    posts = itertools.islice(iter_posts(args.data, args.split), args.posts)
    with tempfile.TemporaryDirectory() as tmp, open(f"{tmp}/p.jsonl", "w") as f:
        counts = predict_stream(pred, posts, JsonlWriter(f), window=window)
    return {"seconds": counts.seconds, "predicted": counts.predicted}


def _configs(batch_sizes: list[int]) -> list[tuple[int, int, str]]:
    out = []
    for b in batch_sizes:
        out.append((b, 8 * b, "sorted in windows of 8 batches"))
        if b > 1:
            out.append((b, b, "input order (no sorting across batches)"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    loaded, load_s = _load_seconds(args)
    configs = _configs([int(b) for b in args.batch_sizes.split(",")])
    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    _run_once(loaded, argparse.Namespace(**{**vars(args), "posts": 2}), 2, 2)  # warm-up
    for _ in range(repeats):  # interleaved: load from other processes hits every config alike
        for i, (batch, window, _) in enumerate(configs):
            res = _run_once(loaded, args, batch, window)
            if res["predicted"] != args.posts:
                raise SystemExit(f"predicted {res['predicted']} of {args.posts} posts")
            times[i].append(res["seconds"])
    env = env_info(args.device)
    rows = []
    for i, (batch, window, order) in enumerate(configs):
        secs = statistics.median(times[i])
        rows.append(
            {
                **env,
                "model": args.model,
                "data": f"{args.data}[{args.split}]",
                "posts": args.posts,
                "max_new_tokens": args.max_new_tokens,
                "decoding": "greedy",
                "batch_size": batch,
                "sort_window": window,
                "order": order,
                "repeats": repeats,
                "load_s": load_s,
                "predict_s": secs,
                "posts_per_s": args.posts / secs,
                "posts_per_s_with_load": args.posts / (secs + load_s),
                "command": "python -m benchmarks.bench_predict " + " ".join(argv or sys.argv[1:]),
                "note": args.note,
            }
        )
    print_table(rows, ["batch_size", "sort_window", "predict_s", "posts_per_s"])
    print(f"model load {load_s:.1f}s (posts_per_s_with_load in the file)")
    slug = "cpu" if torch.device(args.device).type == "cpu" else "cuda"
    name = pathlib.Path(args.model).name
    out = pathlib.Path(args.out) if args.out else results_dir() / f"predict_{name}-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
