"""Corrupted-input suites for robustness evaluation.

Every function takes a list of :class:`Record` and returns NEW records (the input is never
mutated); corrupted images are in memory (``record.image``). All are deterministic under ``seed``.
``record.meta["setting"]`` names the corruption.

- :func:`text_only`: no image. :func:`image_only`: no text.
- :func:`noisy_image`: ``kind="gaussian"`` adds N(0, (level * 255)^2) pixel noise;
  ``kind="blur"`` applies a Gaussian blur of radius ``level * side / 96`` pixels (so a level means
  the same on a 96-px and a 336-px image).
- :func:`noisy_text`: ``kind="drop"`` drops each token with probability ``level`` (one token is
  always kept); ``kind="typo"`` gives each token of 2+ letters a typo (swap, delete, insert or
  replace a letter) with probability ``level``.
- :func:`text_hidden` / :func:`image_hidden`: the modality hidden with every position kept, as
  Progressive Modality Masking hides it in training (one token of it stays visible). The records
  are unchanged but for ``meta["hidden_modality"]``: the keep mask is built by the predictor
  (:func:`aimkp.eval.hidden.predict_fn_for`), which a plain ``Predictor`` refuses.
- :func:`misaligned`: images shuffled across posts by a uniformly random derangement (no post
  keeps its own image); posts without an image keep none.

:data:`SETTINGS` maps setting names (``"clean"``, ``"text_only"``, ``"noisy_image_gaussian_0.2"``,
...) to ``fn(records, seed)``; :func:`apply_setting` runs one by name.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable, Mapping, Sequence

from aimkp.errors import DataError, UsageError

from .record import Record

NOISE_LEVELS = {"gaussian": (0.1, 0.2, 0.4), "blur": (1.0, 2.0, 4.0)}
TEXT_LEVELS = {"drop": (0.1, 0.3, 0.5), "typo": (0.1, 0.3, 0.5)}


def _rng(seed: int, setting: str) -> random.Random:
    # one stream per (seed, setting), independent of which other settings run
    return random.Random(zlib.crc32(f"{seed}:{setting}".encode()))


def _tag(r: Record, setting: str, **changes) -> Record:  # noqa: ANN003
    new = r.replace(**changes)
    new.meta["setting"] = setting
    return new


def clean(records: list[Record], seed: int = 0) -> list[Record]:
    """Copies of the records, unchanged."""
    return [_tag(r, "clean") for r in records]


def text_only(records: list[Record], seed: int = 0) -> list[Record]:
    """The posts without their images."""
    return [_tag(r, "text_only", image=None, image_path=None) for r in records]


def image_only(records: list[Record], seed: int = 0) -> list[Record]:
    """The posts without their text (``text == ""``)."""
    return [_tag(r, "image_only", text="") for r in records]


def _mark_hidden(records: list[Record], kind: str) -> list[Record]:
    out = [_tag(r, f"{kind}_hidden") for r in records]
    for r in out:
        r.meta["hidden_modality"] = kind
    return out


def text_hidden(records: list[Record], seed: int = 0) -> list[Record]:
    """The posts, marked to be decoded with their text hidden (positions kept)."""
    return _mark_hidden(records, "text")


def image_hidden(records: list[Record], seed: int = 0) -> list[Record]:
    """The posts, marked to be decoded with their image hidden (positions kept)."""
    return _mark_hidden(records, "image")


def noisy_image(
    records: list[Record], kind: str = "gaussian", level: float = 0.2, seed: int = 0
) -> list[Record]:
    """Images with Gaussian pixel noise (``level`` = std as a fraction of 255) or blur."""
    import numpy as np
    from PIL import Image, ImageFilter

    if kind not in NOISE_LEVELS:
        raise ValueError(f"noisy_image kind must be one of {sorted(NOISE_LEVELS)}, got {kind!r}")
    if level < 0:
        raise ValueError(f"noise level must be >= 0, got {level}")
    setting = f"noisy_image_{kind}_{level:g}"
    rng = _rng(seed, setting)
    out = []
    for r in records:
        im = r.load_image()
        if im is None:
            out.append(_tag(r, setting))
            continue
        if kind == "gaussian":
            g = np.random.default_rng(rng.getrandbits(63))
            a = np.asarray(im, dtype=np.float32)
            a = a + g.normal(0.0, level * 255.0, size=a.shape).astype(np.float32)
            im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
        else:
            im = im.filter(ImageFilter.GaussianBlur(radius=level * min(im.size) / 96.0))
        out.append(_tag(r, setting, image=im, image_path=None))
    return out


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word))
    op = rng.choice(("swap", "delete", "insert", "replace"))
    letters = string.ascii_lowercase
    if op == "swap" and len(word) >= 2:
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if op == "delete" and len(word) >= 2:
        return word[:i] + word[i + 1 :]
    if op == "insert":
        return word[:i] + rng.choice(letters) + word[i:]
    new = rng.choice([c for c in letters if c != word[i].lower()])
    return word[:i] + new + word[i + 1 :]


def noisy_text(
    records: list[Record], kind: str = "drop", level: float = 0.3, seed: int = 0
) -> list[Record]:
    """Texts with tokens dropped or typos introduced, each with probability ``level``."""
    if kind not in TEXT_LEVELS:
        raise ValueError(f"noisy_text kind must be one of {sorted(TEXT_LEVELS)}, got {kind!r}")
    if not 0 <= level <= 1:
        raise ValueError(f"text noise level must be in [0, 1], got {level}")
    setting = f"noisy_text_{kind}_{level:g}"
    rng = _rng(seed, setting)
    out = []
    for r in records:
        toks = r.text.split()
        if kind == "drop":
            keep = [t for t in toks if rng.random() >= level]
            if toks and not keep:
                keep = [toks[rng.randrange(len(toks))]]
            toks = keep
        else:
            toks = [
                _typo(t, rng) if sum(c.isalpha() for c in t) >= 2 and rng.random() < level else t
                for t in toks
            ]
        out.append(_tag(r, setting, text=" ".join(toks)))
    return out


def derangement(n: int, rng: random.Random) -> list[int]:
    """A uniformly random permutation of ``range(n)`` with no fixed point (``n != 1``)."""
    if n == 1:
        raise ValueError("a single item cannot be deranged")
    perm = list(range(n))
    while n > 1:
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm
    return perm


def misaligned(records: list[Record], seed: int = 0) -> list[Record]:
    """Each post gets another post's image (a derangement over the posts that have one)."""
    rng = _rng(seed, "misaligned")
    with_img = [i for i, r in enumerate(records) if r.has_image]
    if len(with_img) == 1:
        raise DataError("misaligned needs at least two posts with an image")
    perm = derangement(len(with_img), rng) if with_img else []
    donor = {with_img[j]: with_img[perm[j]] for j in range(len(with_img))}
    out = []
    for i, r in enumerate(records):
        if i in donor:
            d = records[donor[i]]
            new = _tag(r, "misaligned", image=d.image, image_path=d.image_path)
            new.meta["image_from"] = d.id
            out.append(new)
        else:
            out.append(_tag(r, "misaligned"))
    return out


Corruption = Callable[[list[Record], int], list[Record]]
"""A setting: ``(records, seed) -> corrupted records``."""


def _leveled(
    name: str,
    corrupt: Callable[[list[Record], str, float, int], list[Record]],
    levels: Mapping[str, Sequence[float]],
) -> dict[str, Corruption]:
    """One setting ``{name}_{kind}_{level}`` per kind and level of ``corrupt(records, kind,
    level, seed)``."""

    def at(kind: str, level: float) -> Corruption:
        return lambda recs, seed: corrupt(recs, kind, level, seed)

    return {f"{name}_{k}_{lv:g}": at(k, lv) for k, lvs in levels.items() for lv in lvs}


def _settings() -> dict[str, Corruption]:
    return {
        "clean": clean,
        "text_only": text_only,
        "image_only": image_only,
        "text_hidden": text_hidden,
        "image_hidden": image_hidden,
        **_leveled("noisy_image", noisy_image, NOISE_LEVELS),
        **_leveled("noisy_text", noisy_text, TEXT_LEVELS),
        "misaligned": misaligned,
    }


SETTINGS = _settings()
DEFAULT_SETTINGS = (
    "clean",
    "text_only",
    "image_only",
    "noisy_image_gaussian_0.2",
    "noisy_image_blur_2",
    "noisy_text_drop_0.3",
    "noisy_text_typo_0.3",
    "misaligned",
)


def apply_setting(name: str, records: list[Record], seed: int = 0) -> list[Record]:
    """Run the corruption called ``name`` (a key of :data:`SETTINGS`)."""
    if name not in SETTINGS:
        raise UsageError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    return SETTINGS[name](records, seed)
