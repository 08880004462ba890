"""Shared builders for the model / forward / predict tests (tiny presets, records, keep masks)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from PIL import Image

from aimkp.data import Record

TEXTS = [
    "wildflower hour in the spring meadow with bees",
    "christmas tree icon vector clip art",
    "a red car on the city street at night",
]
KEYPHRASES = [["wildflower hour", "spring"], ["christmas"], ["car", "city street", "night"]]


def image(seed: int, h: int = 64, w: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def records() -> list[Any]:
    """Multimodal, text-only, image-only and a non-square image (Qwen grid 4 x 5)."""
    return [
        Record("mm", TEXTS[0], KEYPHRASES[0], image=image(0)),
        Record("text-only", TEXTS[1], KEYPHRASES[1]),
        Record("image-only", "", KEYPHRASES[2], image=image(1)),
        Record("wide", TEXTS[2], KEYPHRASES[2], image=image(2, 50, 70)),
    ]


@functools.cache
def _built(name: str) -> tuple:
    from aimkp.models.presets import build_preset

    return build_preset(name, TEXTS + [k for ks in KEYPHRASES for k in ks])


def tiny(name: str, attn: str = "sdpa", lora: bool = True, r: int = 8) -> Any:
    """A fresh LoadedModel of preset ``name`` (deep copy of a cached build), LoRA with random B."""
    import copy

    from aimkp.models import LoadedModel, get_adapter
    from aimkp.models.lora import apply_lora

    model, tok, proc = _built(name)
    model = copy.deepcopy(model)
    model.set_attn_implementation(attn)
    loaded = LoadedModel(model, tok, proc, get_adapter(model, tok, proc), preset=name)
    if lora:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # peft draws lora_A from the global RNG
            apply_lora(loaded, r=r, alpha=2 * r, dropout=0.0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in loaded.model.named_parameters():
                if "lora_B" in n:  # peft starts B at 0: make LoRA gradients non-trivial
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return loaded


def random_keeps(samples: list, copies: int = 2, seed: int = 0) -> tuple[list, list]:
    """Per sample: the original (all kept) and ``copies - 1`` random text + image masks."""
    g = torch.Generator().manual_seed(seed)
    keeps, rows = [], []
    for i, s in enumerate(samples):
        for c in range(copies):
            k = torch.ones(s.length, dtype=torch.bool)
            if c:
                for span in (s.text_span, s.image_span):
                    if span is not None and span[1] > span[0]:
                        k[span[0] : span[1]] = torch.rand(span[1] - span[0], generator=g) > 0.5
            keeps.append(k)
            rows.append(i)
    return keeps, rows
