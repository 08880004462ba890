"""Seconds per training sample of the ``smol-llava`` preset on the CPU, SFT and AimKP steps.

  python benchmarks/smol_speed.py --samples 16 --threads 1 \\
      --out benchmarks/results/smol_train_step-cpu.json

Trains ``--samples`` posts of the default data for two epochs with ``aimkp train`` twice: plain
SFT, then AimKP (whose first epoch trains the originals only, every stride starting at 1; its
second epoch adds the text- and image-masked copies and the per-sample gradient filter). The
JSON holds each epoch's seconds per sample (the loop's ``epoch_s / samples``, validation
excluded), the commands, the device, the commit, and the machine's load average sampled every
10 s during each run: the numbers are only comparable at equal load.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or "unknown"


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _train(method: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "aimkp", "train", "--preset", "smol-llava", "--data", "default",
        "--method", method, "--epochs", "2", "--batch-size", str(args.batch_size),
        "--max-train-samples", str(args.samples), "--lora-r", "16", "--lora-alpha", "32",
        "--lr", "1e-3", "--projector-lr", "1e-3", "--threads", str(args.threads), "--no-eval",
        "--report-to", "none", "--output", str(out),
    ]  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resumed one
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    loads: list[list[float]] = []
    done = threading.Event()

    def sample_load() -> None:
        while not done.wait(10.0):
            loads.append(_loadavg())

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    done.set()
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [
        {
            "epoch": int(r["epoch"]),
            "s_per_sample": round(float(r["epoch_s"]) / args.samples, 3),
            "tokens_per_s": round(float(r["tokens_per_s"]), 1),
            "text_copies": int(float(r["text_copies"] or 0)),
            "image_copies": int(float(r["image_copies"] or 0)),
        }
        for r in rows
    ]
    one_min = [x[0] for x in loads] or [_loadavg()[0]]
    return {
        "command": "aimkp " + " ".join(cmd[3:]),
        "wall_s": round(wall, 1),
        "epochs": epochs,
        "load_1min_mean": round(sum(one_min) / len(one_min), 2),
        "load_1min_max": max(one_min),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="runs/smol-speed", help="run directories (git-ignored)")
    p.add_argument("--out", required=True)
    p.add_argument("--note", default="", help="what else ran on the machine")
    args = p.parse_args()
    work = REPO / args.work
    res = {
        "benchmark": "smol-llava training step, seconds per sample",
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": args.threads,
        "torch": torch.__version__,
        "commit": _commit(),
        "samples": args.samples,
        "batch_size": args.batch_size,
        "note": args.note,
        "sft": _train("sft", args, work / "sft"),
        "aimkp": _train("aimkp", args, work / "aimkp"),
    }
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
