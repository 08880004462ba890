"""Build an MKP dataset from Debian's ``openclipart-svg`` (public-domain clip art, Open Clip Art
Library 0.18).

Every drawing's SVG carries RDF metadata: ``dc:title``, ``dc:description``, ``dc:creator`` and
tags (``dc:subject/rdf:Bag/rdf:li``). A record is:

- text: the title and the description (``"bat. a flying mammal"``). About a third of the drawings
  carry their collection's name as title (``"Lemon SVG theme"``, ``"Part of the Flat Icon
  Collection (...)"``, ``"gramastar"``); for a title shared by ``>= COLLECTION_TITLE_MIN``
  drawings the drawing's own name is taken from its file name instead (``home13.svg`` ->
  ``"home"``), with author names and numbers removed.
- keyphrases: the cleaned tags (:func:`clean_tags`): lower-cased; camelCase, hyphens and
  underscores split into words; a tag of 3+ space-separated words is a list of tags and is split;
  tags naming the collection, the library, authors, file housekeeping or numbers are dropped.
- image: the SVG rendered with cairosvg, composited on white, fitted into a ``size x size`` RGB
  square and saved as an optimised PNG.

Curation (:func:`curate`): duplicates (same text and keyphrases) are dropped, at most
``max_per_tagset`` drawings share one exact keyphrase set (the library holds 1,375 generated stars
tagged identically), and a drawing is kept only when at least one of its keyphrases occurs in
``>= min_freq`` kept drawings (so the task is learnable). Splits are drawn by a seeded shuffle.

Run ``aimkp data build-openclipart --out DIR --size 96 --max N`` (needs ``cairosvg`` and
``libcairo2``; ``apt-get install -y openclipart-svg``).
"""

from __future__ import annotations

import collections
import html
import io
import json
import logging
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aimkp.data.images import to_rgb
from aimkp.errors import UsageError

logger = logging.getLogger("aimkp.data.openclipart")

DEFAULT_ROOT = "/usr/share/openclipart/svg"
COLLECTION_TITLE_MIN = 10

# Tags that name the collection, the library, the file or its housekeeping, not the drawing.
DROP_TAGS = {
    "",
    "clip art",
    "clipart",
    "clip arts",
    "cliparts",
    "openclipart",
    "open clip art",
    "open clip art library",
    "ocal",
    "svg",
    "public domain",
    "pd",
    "cc0",
    "media",
    "image",
    "images",
    "png",
    "inkscape",
    "hash",
    "icons",
    "icon",
    "theme",
    "lemon theme icon",
    "flat icon collection",
    "app icon",
    "appicon",
    "mimetypes",
    "mime types",
    "mime",
    "magick",
    "unsorted",
    "special",
    "miscellany",
    "misc",
    "stock",
    "remix",
    "drawing",
    "graphics",
    "illustration",
    "aiga",
    "etiquette icons",
    "kanotix",
    "font samples",
}
STOPWORDS = {"a", "an", "and", "the", "of", "in", "on", "for", "to", "with", "de", "la", "le"}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_NON_WORD = re.compile(r"[^0-9a-z' ]+")
_TAG_RE = re.compile(r"<rdf:li[^>]*>(.*?)</rdf:li>", re.S)


@dataclass
class Drawing:
    """Metadata of one SVG drawing."""

    path: str
    title: str
    description: str
    creator: str
    tags: list[str] = field(default_factory=list)


def _text_of(md: str, tag: str) -> str:
    m = re.search(rf"<{tag}[^>]*>(.*?)</{tag}>", md, re.S)
    return html.unescape(m.group(1)).strip() if m else ""


def parse_svg_metadata(path: str | os.PathLike[str]) -> Drawing:
    """Read title, description, creator and raw tags from one SVG's RDF metadata.

    Raises ``ValueError`` naming the file when it has no ``<metadata>`` block.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        s = f.read()
    m = re.search(r"<metadata.*?</metadata>", s, re.S)
    if not m:
        raise ValueError(f"{path}: no <metadata> block")
    md = m.group(0)
    work = re.search(r"<cc:Work.*?</cc:Work>", md, re.S)
    w = work.group(0) if work else md
    title = _text_of(
        re.sub(r"<dc:(publisher|creator|rights)>.*?</dc:\1>", "", w, flags=re.S), "dc:title"
    )
    desc = _text_of(w, "dc:description")
    cm = re.search(r"<dc:creator>.*?<dc:title>(.*?)</dc:title>", w, re.S)
    creator = html.unescape(cm.group(1)).strip() if cm else ""
    subj = re.search(r"<dc:subject>.*?</dc:subject>", w, re.S)
    tags = [html.unescape(t).strip() for t in _TAG_RE.findall(subj.group(0))] if subj else []
    return Drawing(os.fspath(path), title, desc, creator, tags)


def split_words(tag: str) -> str:
    """``"musicStuff"`` -> ``"music stuff"``, ``"north_america"`` -> ``"north america"``."""
    t = _CAMEL.sub(" ", tag.strip())
    t = t.replace("_", " ").replace("-", " ").lower()
    t = _NON_WORD.sub(" ", t)
    return " ".join(t.split())


def _author_words(creator: str) -> set[str]:
    words = {w for w in split_words(creator).split() if len(w) > 2}
    return words


def clean_tags(tags: Iterable[str], creator: str = "") -> list[str]:
    """Raw tags -> keyphrases (order kept, duplicates removed).

    >>> clean_tags(["Mammal", "bat", "clip art", "northAmerica", "space astronomy planet"], "J D")
    ['mammal', 'bat', 'north america', 'space', 'astronomy', 'planet']
    """
    author = split_words(creator)
    author_words = _author_words(creator)
    out: list[str] = []
    for raw in tags:
        for piece in re.split(r"[,;]", raw):
            phrase = split_words(piece)
            # "space astronomy planet" (3+ words separated by spaces) is a list of tags;
            # "united_nations_member" or "wide angle" is one phrase
            spaced = len(piece.split()) >= 3
            cands = phrase.split() if spaced else [phrase]
            for c in cands:
                if c in DROP_TAGS or c in STOPWORDS or not c or c.isdigit() or len(c) < 2:
                    continue
                if re.fullmatch(r"[0-9. ]+|0x[0-9a-f]+", c):  # numbers, hex ids
                    continue
                if author and (c == author or set(c.split()) <= author_words):
                    continue
                if c not in out:
                    out.append(c)
    return out


def _name_from_file(path: str, creator: str) -> str:
    stem = Path(path).stem
    words = split_words(stem).split()
    author = _author_words(creator)
    words = [w for w in words if not w.isdigit() and w not in author]
    words = [re.sub(r"\d+$", "", w) for w in words]
    return " ".join(w for w in words if len(w) > 1)


def _clean_title(title: str, creator: str) -> str:
    t = re.sub(r"^\s*clip\s*art\s+by\s+.*?\s+-\s+", "", title, flags=re.I)
    t = t.replace("_", " ")
    return " ".join(t.split())


def collect(root: str | os.PathLike[str] = DEFAULT_ROOT) -> tuple[list[dict[str, Any]], dict]:
    """Parse every SVG under ``root`` (symlinked duplicates skipped) into candidate records.

    Returns ``(candidates, stats)``; a candidate is ``{path, text, keyphrases, creator}``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(
            f"{root}: not found; install the clip art with `apt-get install -y openclipart-svg`"
        )
    files = sorted(p for p in root.rglob("*.svg") if not p.is_symlink())
    stats: collections.Counter[str] = collections.Counter(files=len(files))
    drawings = []
    for p in files:
        try:
            drawings.append(parse_svg_metadata(p))
        except ValueError:
            stats["no metadata"] += 1
    title_count = collections.Counter(d.title.strip().lower() for d in drawings)
    out = []
    for d in drawings:
        title = _clean_title(d.title, d.creator)
        generic = (
            not title
            or title_count[d.title.strip().lower()] >= COLLECTION_TITLE_MIN
            or title.lower().startswith("part of the")
        )
        name = _name_from_file(d.path, d.creator) if generic else title
        desc = " ".join(d.description.split())
        if desc.lower() == name.lower():
            desc = ""
        text = name if not desc else f"{name}. {desc}"
        kps = clean_tags(d.tags, d.creator)
        if not kps:
            stats["no usable tag"] += 1
            continue
        if not text.strip():
            stats["no text"] += 1
            continue
        out.append(
            {
                "path": os.path.relpath(d.path, root),
                "text": text,
                "keyphrases": kps,
                "creator": d.creator,
            }
        )
    stats["candidates"] = len(out)
    return out, dict(stats)


def curate(
    cands: list[dict[str, Any]], *, min_freq: int = 5, max_per_tagset: int = 25
) -> tuple[list[dict[str, Any]], dict]:
    """Dedupe, cap identical tag sets, keep drawings with a keyphrase seen ``>= min_freq`` times."""
    stats: collections.Counter[str] = collections.Counter()
    seen = set()
    per_set: collections.Counter[tuple[str, ...]] = collections.Counter()
    kept = []
    for c in cands:
        key = (c["text"].lower(), tuple(sorted(c["keyphrases"])))
        if key in seen:
            stats["duplicate"] += 1
            continue
        seen.add(key)
        ts = tuple(sorted(c["keyphrases"]))
        if per_set[ts] >= max_per_tagset:
            stats["tag set over cap"] += 1
            continue
        per_set[ts] += 1
        kept.append(c)
    # the frequency filter changes the counts it depends on: iterate to a fixed point
    while True:
        freq = collections.Counter(k for c in kept for k in c["keyphrases"])
        nxt = [c for c in kept if any(freq[k] >= min_freq for k in c["keyphrases"])]
        if len(nxt) == len(kept):
            break
        stats["no frequent keyphrase"] += len(kept) - len(nxt)
        kept = nxt
    return kept, dict(stats)


def render_png(svg_path: str, out_path: str, size: int) -> None:
    """Render an SVG to a ``size x size`` RGB PNG on white (aspect kept, centred, optimised)."""
    import cairosvg
    from PIL import Image

    data = cairosvg.svg2png(url=svg_path, output_width=size * 3)
    with Image.open(io.BytesIO(data)) as src:
        im = to_rgb(src)  # transparent SVG background on white
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    if canvas.getextrema() == ((255, 255),) * 3:
        raise ValueError(f"{svg_path}: renders blank")
    canvas.save(out_path, format="PNG", optimize=True)


def _render_job(args: tuple[str, str, int]) -> str | None:
    svg, out, size = args
    try:
        render_png(svg, out, size)
    except Exception as exc:  # noqa: BLE001 - a broken drawing is counted, never fatal
        return f"{type(exc).__name__}: {str(exc)[:120]}"
    return None


def build(
    out_dir: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    size: int = 96,
    max_records: int | None = None,
    n_valid: int = 250,
    n_test: int = 250,
    min_freq: int = 5,
    max_per_tagset: int = 25,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Build ``out_dir/{train,valid,test}.jsonl`` and ``out_dir/images/*.png``; return the stats.

    The JSONL is deterministic for a given package version, ``seed`` and arguments (cairo may
    render a few PNGs a few pixel values differently between runs).
    """
    import multiprocessing

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cands, st_collect = collect(root)
    kept, st_curate = curate(cands, min_freq=min_freq, max_per_tagset=max_per_tagset)
    rng = random.Random(seed)
    rng.shuffle(kept)
    if max_records is not None:
        kept = kept[: int(max_records * 1.05) + 20]  # spare rows for drawings that fail to render
    jobs = []
    for i, c in enumerate(kept):
        c["id"] = f"ocal-{i:05d}"
        c["image"] = f"images/{c['id']}.png"
        jobs.append((os.path.join(root, c["path"]), os.fspath(out / c["image"]), size))
    with multiprocessing.Pool(workers or os.cpu_count() or 1) as pool:
        errors = pool.map(_render_job, jobs, chunksize=16)
    render_fail: collections.Counter[str] = collections.Counter()
    good = []
    for c, err in zip(kept, errors):
        if err is None:
            good.append(c)
        else:
            render_fail["blank" if "blank" in err else "render error"] += 1
            logger.info("skipped %s: %s", c["path"], err)
            img = out / c["image"]
            if img.exists():
                img.unlink()
    if max_records is not None:
        for c in good[max_records:]:
            (out / c["image"]).unlink()
        good = good[:max_records]
    if len(good) < n_valid + n_test + 1:
        raise UsageError(f"only {len(good)} drawings left; fewer than valid + test + 1")
    splits = {
        "test": good[:n_test],
        "valid": good[n_test : n_test + n_valid],
        "train": good[n_test + n_valid :],
    }
    for name, recs in splits.items():
        recs.sort(key=lambda c: c["id"])
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for c in recs:
                row = {
                    "id": c["id"],
                    "image": c["image"],
                    "text": c["text"],
                    "keyphrases": c["keyphrases"],
                    "source": f"openclipart-svg:{c['path']}",
                    "author": c["creator"],
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    freq = collections.Counter(k for c in good for k in c["keyphrases"])
    stats = {
        "collect": st_collect,
        "curate": st_curate,
        "render_skipped": dict(render_fail),
        "splits": {k: len(v) for k, v in splits.items()},
        "keyphrases_per_record": round(sum(len(c["keyphrases"]) for c in good) / len(good), 3),
        "distinct_keyphrases": len(freq),
        "present_fraction": round(_present_fraction(good), 3),
        "params": {
            "size": size,
            "max_records": max_records,
            "min_freq": min_freq,
            "max_per_tagset": max_per_tagset,
            "seed": seed,
            "collection_title_min": COLLECTION_TITLE_MIN,
        },
        "package_version": debian_package_version(),
    }
    with open(out / "build_stats.json", "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    return stats


def _present_fraction(recs: list[dict[str, Any]]) -> float:
    n = hit = 0
    for c in recs:
        text = " " + " ".join(split_words(c["text"]).split()) + " "
        for k in c["keyphrases"]:
            n += 1
            hit += f" {k} " in text
    return hit / max(n, 1)


def debian_package_version(package: str = "openclipart-svg") -> str:
    """The installed Debian version of ``package`` (from dpkg's status file), or ``"unknown"``."""
    try:
        with open("/var/lib/dpkg/status", encoding="utf-8", errors="replace") as f:
            block = f.read().split("\n\n")
    except OSError:
        return "unknown"
    for b in block:
        if re.search(rf"^Package: {re.escape(package)}$", b, re.M):
            m = re.search(r"^Version: (.+)$", b, re.M)
            return m.group(1).strip() if m else "unknown"
    return "unknown"
