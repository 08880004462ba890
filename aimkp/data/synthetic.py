"""Procedural MKP posts with known ground truth, for controlled experiments.

Each post shows one coloured shape (drawn with PIL) and says a few sentences about a topic. Its
keyphrases, in this order:

1. the text keyphrase: the topic (``"football"``); the text gives cue words for it (``"goal"``,
   ``"match"``) and names it outright only sometimes, so it is present in about 1/3 of posts;
2. the image keyphrase: the shape (``"circle"``); the text never names a shape or a colour;
3. the joint keyphrase: colour + topic noun (``"red team"``): the colour is only in the image and
   the noun only follows from the topic, so it needs both modalities.

With ``modal_split=True`` (``load_dataset("synthetic-split:SEED")``) a post has only the first two:
one keyphrase that only the text tells and one that only the image tells, so text-only and
image-only inputs each lose a known half of the answer. ``shortcut=p`` adds a tag word to the
text (``"zest"`` for circles, ...): on the split it is generated for (train) it names the post's
shape with probability ``p`` (else a random shape's tag), with ``p = 0`` (valid / test) it is
always a random shape's: a text cue that predicts the image keyphrase on train but not on test.

``record.meta["kp_source"]`` maps each keyphrase to ``"text"``, ``"image"`` or ``"both"``, and
``meta`` also keeps ``shape``, ``colour`` and ``topic``. Deterministic in ``(n, seed,
image_size)``; images are in memory (``record.image``).

>>> recs = generate(4, seed=0, image_size=32)
>>> recs[0].keyphrases, recs[0].meta["kp_source"]   # doctest: +SKIP
(['cooking', 'triangle', 'blue dish'], {'cooking': 'text', 'triangle': 'image', ...})
"""

from __future__ import annotations

import random

from .record import Record

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
# topic -> (cue words, the noun of the joint keyphrase)
TOPICS = {
    "football": (("goal", "match", "striker", "pitch", "league"), "team"),
    "cooking": (("recipe", "oven", "dinner", "spices", "kitchen"), "dish"),
    "travel": (("flight", "passport", "hotel", "journey", "luggage"), "trip"),
    "music": (("concert", "guitar", "melody", "album", "drums"), "song"),
    "gardening": (("seeds", "soil", "flowers", "compost", "watering"), "garden"),
    "science": (("experiment", "laboratory", "data", "hypothesis", "microscope"), "project"),
    "fashion": (("dress", "runway", "designer", "fabric", "style"), "outfit"),
    "gaming": (("console", "level", "controller", "quest", "multiplayer"), "game"),
}
_TEMPLATES = (
    "what a day for {a} and {b} !",
    "cannot stop thinking about the {a} , the {b} was perfect .",
    "new post : {a} , {b} and more {c} .",
    "finally some {a} time . the {b} looks great .",
    "my {a} is ready , now the {b} .",
)
# the shortcut's tag word of each shape (words the text uses nowhere else)
SHAPE_TAGS = dict(zip(SHAPES, ("zest", "quill", "brisk", "vapor", "knack", "plume")))
_FILLER = ("today", "friends", "weekend", "really", "love", "this", "so", "happy", "again", "now")


def _draw(shape: str, rgb: tuple[int, int, int], size: int, rng: random.Random):  # noqa: ANN202
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(235, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = size * rng.uniform(0.22, 0.36)
    cx = size / 2 + rng.uniform(-0.1, 0.1) * size
    cy = size / 2 + rng.uniform(-0.1, 0.1) * size
    col = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in rgb)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
    elif shape == "star":
        import math

        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=col)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")
    return im


def _shortcut_tag(shape: str, p: float, rng: random.Random) -> str:
    """The tag word: the shape's own with probability ``p``, else a uniformly random shape's."""
    return SHAPE_TAGS[shape if rng.random() < p else rng.choice(SHAPES)]


def generate(
    n: int,
    seed: int = 0,
    image_size: int = 64,
    id_prefix: str = "syn",
    modal_split: bool = False,
    shortcut: float | None = None,
) -> list[Record]:
    """``n`` synthetic posts (``image`` in memory, RGB ``[image_size, image_size]``).

    Args:
        n: number of posts (>= 0).
        seed: the random seed; the same arguments give the same posts.
        image_size: side of the square image in pixels (>= 16).
        id_prefix: ids are ``f"{id_prefix}-{i:05d}"``.
        modal_split: keyphrases [text keyphrase, image keyphrase] only (no joint one).
        shortcut: None (no tag word) or the probability in [0, 1] that the text's tag word
            names the post's own shape (module docstring).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if shortcut is not None and not 0.0 <= shortcut <= 1.0:
        raise ValueError(f"shortcut must be a probability in [0, 1], got {shortcut}")
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    colours = sorted(COLOURS)
    out = []
    for i in range(n):
        shape = rng.choice(SHAPES)
        colour = rng.choice(colours)
        topic = rng.choice(topics)
        cues, noun = TOPICS[topic]
        a, b, c = rng.sample(cues, 3)
        if rng.random() < 1 / 3:  # the topic itself is named: a present keyphrase
            c = topic
        text = rng.choice(_TEMPLATES).format(a=a, b=b, c=c)
        fillers = rng.sample(_FILLER, rng.randint(0, 3))
        text = " ".join([*fillers, text]) if fillers else text
        if shortcut is not None:
            text = f"{text} {_shortcut_tag(shape, shortcut, rng)}"
        joint = f"{colour} {noun}"
        kps = [topic, shape] if modal_split else [topic, shape, joint]
        out.append(
            Record(
                id=f"{id_prefix}-{i:05d}",
                text=text,
                keyphrases=kps,
                image=_draw(shape, COLOURS[colour], image_size, rng),
                meta={
                    "kp_source": dict(zip(kps, ("text", "image", "both"))),
                    "shape": shape,
                    "colour": colour,
                    "topic": topic,
                },
            )
        )
    return out
