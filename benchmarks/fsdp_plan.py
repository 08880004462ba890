"""Memory per rank of AimKP training at a 7B shape under FSDP2 (``aimkp train --fsdp``).

Reads the memory plan's committed measurements (``benchmarks/results/memory_plan-SHAPE-cpu.json``,
written by :mod:`benchmarks.memory_plan`: one decoder layer and one vision layer measured, then
extrapolated to the real depth at B = 8 samples per step in bf16) and splits them per rank for
LoRA (r = 128, projector trained) and full fine-tuning on 1, 2, 4 and 8 GPUs::

    python benchmarks/fsdp_plan.py [--batch 8] [--device-gb 80] [--ckpt]

Per rank, in GB (1e9 bytes):

- ``sharded``: what FSDP2 divides by the world size N: frozen weights in bf16 (2 bytes), trainable
  weights in fp32 with their fp32 gradient and AdamW's two fp32 moments (16 bytes).
- ``gathered``: what is unsharded at once: the root unit (embeddings, LM head, projector, final
  norm: gathered for the whole forward and backward) and two decoder layers (the one computing and
  the one prefetched), all-gathered in bf16 (the mixed-precision policy's ``param_dtype``), plus
  one layer's trainable gradients in fp32 before the reduce-scatter.
- ``activations``: the measured autograd activations and the rest of the step (vision features,
  logits, engine work) of the ``correction`` rows (``--fsdp`` forces ``--reweight correction``: no
  stash), with ``--ckpt`` the ``correction+ckpt`` rows (activation checkpointing), scaled linearly
  from B = 8 to ``--batch`` samples PER RANK (each rank runs its own micro-batch; the correction
  pass runs after the first backward, so it adds no peak). Full fine-tuning is taken to save the
  same activations as LoRA (the decoder's linear inputs are saved either way; LoRA adds its small
  ``r``-wide intermediates).
- ``accum``: with ``--grad-accum`` > 1, the unsharded fp32 gradients of the trainable weights kept
  between micro-steps (``set_requires_gradient_sync(False)``), listed apart.

This is arithmetic on measured numbers, not a measurement on GPUs: the CUDA allocator's
fragmentation and NCCL's buffers (typically 1-3 GB) are not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any

GB = 1e9
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PLAN_BATCH = 8  # the batch memory_plan.py extrapolated its JSON rows to (its --batch default)
WORLDS = (1, 2, 4, 8)
SHAPES = {  # vocabulary and width of the language model (aimkp.models.shapes): embedding + head
    "llava7b": (32064, 4096),
    "qwen2vl7b": (152064, 3584),
}
MODES = ("lora", "full")


@dataclass(frozen=True)
class Params:
    """Parameter counts of one 7B shape, as the memory plan measured them."""

    layers: int
    vision_layers: int
    frozen_layer: int  # a decoder layer's base weights
    train_layer: int  # a decoder layer's LoRA factors
    frozen_other: int  # embedding, LM head, vision stem, the projector's frozen copy (LoRA)
    train_other: int  # the trained projector
    frozen_vision_layer: int
    vocab: int
    hidden: int

    def split(self, mode: str) -> tuple[float, float, float, float]:
        """``(frozen, trainable, root unit, one layer)`` parameter counts for ``mode``.

        Full fine-tuning trains every decoder weight, the embedding, the LM head and the
        projector (no frozen projector copy, no LoRA factors); the vision tower stays frozen."""
        vision = self.frozen_vision_layer * self.vision_layers
        head_embed = 2 * self.vocab * self.hidden
        if mode == "lora":
            frozen = self.frozen_layer * self.layers + vision + self.frozen_other
            trainable = self.train_layer * self.layers + self.train_other
            return frozen, trainable, self.frozen_other + self.train_other, self.layer("lora")
        if mode != "full":
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        stem = self.frozen_other - head_embed - self.train_other  # vision stem and norms
        frozen = vision + stem
        trainable = self.frozen_layer * self.layers + head_embed + self.train_other
        return frozen, trainable, head_embed + self.train_other + stem, self.layer("full")

    def layer(self, mode: str) -> float:
        return self.frozen_layer + (self.train_layer if mode == "lora" else 0)

    def trainable_layer(self, mode: str) -> float:
        return self.train_layer if mode == "lora" else self.frozen_layer


def load_plan(shape: str, results: pathlib.Path = RESULTS) -> list[dict[str, Any]]:
    """The memory plan's rows for ``shape``."""
    return json.loads((results / f"memory_plan-{shape}-cpu.json").read_text())


def params_of(rows: list[dict[str, Any]], shape: str) -> Params:
    r = rows[0]
    vocab, hidden = SHAPES[shape]
    return Params(
        layers=int(r["layers_full"]),
        vision_layers=int(r["vision_layers_full"]),
        frozen_layer=int(r["frozen_layer"]),
        train_layer=int(r["train_layer"]),
        frozen_other=int(r["frozen_other"]),
        train_other=int(r["train_other"]),
        frozen_vision_layer=int(r["frozen_vision_layer"]),
        vocab=vocab,
        hidden=hidden,
    )


def activations_gb(rows: list[dict[str, Any]], batch: int, ckpt: bool) -> float:
    """Activations and the step's other memory of the correction step at ``batch`` samples."""
    want = "correction+ckpt" if ckpt else "correction"
    row = next((r for r in rows if r["storage"] == want), None)
    if row is None:
        raise ValueError(f"the memory plan has no {want!r} row")
    return (row["layers_gb"] + row["other_gb"]) * batch / PLAN_BATCH


def rank_plan(p: Params, mode: str, world: int, act_gb: float) -> dict[str, float]:
    """GB per rank (see the module doc)."""
    frozen, trainable, root, layer = p.split(mode)
    sharded = (frozen * 2 + trainable * 16) / world / GB
    gathered = ((root + 2 * layer) * 2 + p.trainable_layer(mode) * 4) / GB if world > 1 else 0.0
    total = sharded + gathered + act_gb
    return {
        "sharded_gb": sharded,
        "gathered_gb": gathered,
        "activations_gb": act_gb,
        "total_gb": total,
        "accum_gb": trainable * 4 / GB if world > 1 else 0.0,
    }


def largest_batch(p: Params, rows: list[dict[str, Any]], mode: str, world: int,
                  device_gb: float, ckpt: bool) -> int:  # fmt: skip
    """The largest per-rank batch whose total fits ``device_gb`` (0: not even one sample)."""
    fixed = rank_plan(p, mode, world, 0.0)["total_gb"]
    per_sample = activations_gb(rows, 1, ckpt)
    return max(0, math.floor((device_gb - fixed) / per_sample))


def table(batch: int, device_gb: float, ckpt: bool, results: pathlib.Path = RESULTS) -> str:
    """The per-rank plan of both shapes as a Markdown table."""
    head = (
        f"| shape | training | GPUs | sharded | gathered | activations (B={batch}/rank) | "
        f"total | fits {device_gb:g} GB | largest B/rank | + accum grads |"
    )
    lines = [head, "|" + "---|" * 10]
    for shape in SHAPES:
        rows = load_plan(shape, results)
        p = params_of(rows, shape)
        act = activations_gb(rows, batch, ckpt)
        for mode in MODES:
            for world in WORLDS:
                r = rank_plan(p, mode, world, act)
                fits = "yes" if r["total_gb"] <= device_gb else "no"
                big = largest_batch(p, rows, mode, world, device_gb, ckpt)
                lines.append(
                    f"| {shape} | {mode} | {world} | {r['sharded_gb']:.1f} | "
                    f"{r['gathered_gb']:.1f} | {r['activations_gb']:.1f} | {r['total_gb']:.1f} | "
                    f"{fits} | {big} | {r['accum_gb']:.1f} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="samples per rank per micro-step")
    ap.add_argument("--device-gb", type=float, default=80.0)
    ap.add_argument("--ckpt", action="store_true", help="with activation checkpointing")
    args = ap.parse_args(argv)
    print(table(args.batch, args.device_gb, args.ckpt))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
