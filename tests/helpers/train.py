"""Records and gradient access shared by the training-step tests."""

from __future__ import annotations

import numpy as np
from PIL import Image

from aimkp.data import Record

WORDS = "red blue green circle square tree cat dog house sun moon star flower car boat".split()


def varied_records(n: int, seed: int = 0, with_image: bool = True):
    """``n`` records of random 64 x 64 images and 3-6 word texts, record 2 without an image."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        # vary the lengths: odd text sizes, one record without an image
        text = " ".join(rng.choice(WORDS, 3 + (i % 4)))
        kps = [str(k) for k in rng.choice(WORDS, 1 + i % 2, replace=False)]
        has_img = with_image and i != 2
        out.append(Record(id=str(i), text=text, keyphrases=kps, image=img if has_img else None))
    return out


def trainable_params(loaded):
    """The parameters the optimizer would update, in ``parameters()`` order."""
    return [p for p in loaded.model.parameters() if p.requires_grad]


def trainable_grads(loaded):
    """Copies of their ``.grad``."""
    return [p.grad.detach().clone() for p in trainable_params(loaded)]


def zero_trainable_grads(loaded):
    """``.grad = None`` on each."""
    for p in trainable_params(loaded):
        p.grad = None
