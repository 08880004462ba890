"""Streaming, resumable prediction over collections of any size: what ``aimkp predict`` runs.

>>> plan = claim_output(Path("tags.jsonl"), resume=True, overwrite=False)
>>> posts = iter_posts("posts.jsonl", "test")                      # read lazily
>>> with open_writer(plan) as writer:
...     counts = predict_stream(predictor, posts, writer, done_ids=plan.done_ids)

Posts are read one at a time and encoded (images preprocessed once) a window at a time; inside a
window they are sorted by prompt length so that a batch pads little (left padding, KV cache:
:meth:`aimkp.eval.predict.Predictor.generate_batch`). Each batch's predictions are written as soon
as it finishes, in one ``write`` followed by ``flush``, so a killed run leaves whole lines (at most
the last one torn, which ``--resume`` repairs):

- ``.jsonl``: one object per post, ``{"id", "keyphrases", "generation"}``, in the order batches
  finish (ids make the order irrelevant). ``--resume`` skips posts whose id is already written.
- any other suffix (``.txt``): one line per post, its keyphrases joined by ``;`` (what
  ``aimkp score`` reads), in input order (a line waits for the posts before it in its window).
  It carries no ids, so ``--resume`` is refused for it.

Memory stays flat in the number of posts: one window of encoded posts, plus the set of ids
(tens of bytes per post) that guards ``--resume`` against a post written twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from aimkp.data.lazy import Post
from aimkp.data.record import ReadStats
from aimkp.errors import DataError, UsageError
from aimkp.eval.predict import PostTooLong, Predictor, parse_keyphrases

logger = logging.getLogger("aimkp.predict")

JSONL_SUFFIX = ".jsonl"


@dataclass
class OutputPlan:
    """What an output file is and how it is to be written (see :func:`claim_output`)."""

    path: Path
    jsonl: bool
    mode: str  # "new", "overwrite" or "resume"
    done_ids: set[str] = field(default_factory=set)


def claim_output(path: Path, *, resume: bool, overwrite: bool) -> OutputPlan:
    """The policy for an existing output, checked before any model work.

    A non-empty file is refused (UsageError, the file untouched) unless ``overwrite`` (it is
    replaced when writing starts) or ``resume`` (its predictions are kept and skipped; a torn
    last line is cut off). ``resume`` needs a ``.jsonl`` output: ids say what is done."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    jsonl = path.suffix.lower() == JSONL_SUFFIX
    exists = path.is_file() and path.stat().st_size > 0
    if resume and not jsonl:
        raise UsageError(
            f"--out {path}: --resume needs a .jsonl output (its lines carry post ids; a "
            "';'-per-line file has none): predict to .jsonl, or pass --overwrite"
        )
    if not exists:
        return OutputPlan(path, jsonl, "new")
    if overwrite:
        return OutputPlan(path, jsonl, "overwrite")
    if not resume:
        raise UsageError(
            f"--out {path}: exists and is not empty ({path.stat().st_size} bytes); pass "
            "--resume to continue it or --overwrite to replace it"
        )
    return OutputPlan(path, jsonl, "resume", read_done_ids(path))


def read_done_ids(path: Path) -> set[str]:
    """Ids of the predictions already in the JSONL ``path``; a last line cut short by a killed
    run (no newline, or not JSON) is removed from the file. Any other bad line is an error."""
    done: set[str] = set()
    with path.open("rb") as f:
        keep = 0  # bytes of whole, valid lines
        for lineno, raw in enumerate(f, 1):
            torn = not raw.endswith(b"\n")
            try:
                rid = _prediction_id(raw)
            except ValueError as exc:
                if torn:
                    break
                raise DataError(f"{path}:{lineno}: not a prediction line ({exc})") from None
            if torn:  # a whole object without its newline: the write stopped right there
                break
            if rid in done:
                raise DataError(f"{path}:{lineno}: id {rid!r} written twice")
            done.add(rid)
            keep += len(raw)
    if keep < path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(keep)
        logger.warning("%s: cut a torn last line (%d bytes kept)", path, keep)
    return done


def _prediction_id(raw: bytes) -> str:
    obj = json.loads(raw)
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        raise ValueError("expected a JSON object with a string 'id'")
    return obj["id"]


class Writer(Protocol):
    def write(self, done: Sequence[tuple[int, Post, str | None]]) -> None: ...


class JsonlWriter:
    """One JSON object per post, each batch in one write, flushed."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def write(self, done: Sequence[tuple[int, Post, str | None]]) -> None:
        lines = [_jsonl_line(post, text) for _, post, text in done if text is not None]
        if lines:
            self.f.write("".join(lines))
            self.f.flush()


def _jsonl_line(post: Post, text: str) -> str:
    obj = {"id": post.record.id, "keyphrases": parse_keyphrases(text), "generation": text}
    return json.dumps(obj, ensure_ascii=False) + "\n"


class TxtWriter:
    """``kp1;kp2`` lines in input order: a post's line waits for the posts before it. A post
    that produces no line (skipped) is passed with ``text=None`` so that the order advances."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.next = 0
        self.pending: dict[int, str | None] = {}

    def write(self, done: Sequence[tuple[int, Post, str | None]]) -> None:
        for index, _, text in done:
            self.pending[index] = text
        lines = []
        while self.next in self.pending:
            text = self.pending.pop(self.next)
            if text is not None:
                lines.append(";".join(parse_keyphrases(text)) + "\n")
            self.next += 1
        if lines:
            self.f.write("".join(lines))
            self.f.flush()


class _OpenedOnFirstWrite:
    """A text file opened (created, truncated or appended to) at its first write, so that a run
    failing before its first prediction leaves an existing output, or no file, as it was."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path, self.mode = path, mode
        self.f: IO[str] | None = None

    def write(self, text: str) -> None:
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = self.path.open(self.mode, encoding="utf-8", newline="\n")
        self.f.write(text)

    def flush(self) -> None:
        if self.f is not None:
            self.f.flush()

    def close(self, finished: bool) -> None:
        if self.f is None and finished:
            self.write("")  # a finished run always leaves its (maybe empty) output
        if self.f is not None:
            self.f.close()


@contextlib.contextmanager
def open_writer(plan: OutputPlan) -> Iterator[Writer]:
    """The :class:`Writer` of ``plan``. The file is opened at the first prediction (appended to
    when resuming, else created or replaced); a run that fails before it leaves the file alone."""
    f = _OpenedOnFirstWrite(plan.path, "a" if plan.mode == "resume" else "w")
    finished = False
    try:
        yield JsonlWriter(f) if plan.jsonl else TxtWriter(f)
        finished = True
    finally:
        f.close(finished)


@dataclass
class StreamCounts:
    """What a streaming prediction did: ``skipped`` holds the posts it rejected itself (too
    long, duplicate id) by reason with their first locations; the reader's own skips are in
    the reader's :class:`ReadStats`."""

    predicted: int = 0
    resumed: int = 0
    skipped: ReadStats = field(default_factory=ReadStats)
    seconds: float = 0.0

    @property
    def posts_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0


def predict_stream(
    predictor: Predictor,
    posts: Iterable[Post],
    writer: Writer,
    *,
    done_ids: set[str] | None = None,
    window: int | None = None,
    on_bad_record: str = "error",
    progress: Any = None,
) -> StreamCounts:
    """Predict ``posts`` window by window, writing each batch as it finishes.

    Args:
        predictor: the model and its decoding options (``batch_size`` posts per batch).
        posts: :class:`~aimkp.data.lazy.Post` items, consumed lazily.
        writer: where the predictions go (:class:`JsonlWriter`, :class:`TxtWriter`).
        done_ids: ids already written (``--resume``): those posts are skipped and counted.
        window: posts encoded and sorted by length together (default ``8 * batch_size``).
        on_bad_record: ``"skip"`` skips a post that cannot be predicted (too long, duplicate id,
            unreadable image), logged with its location and counted; ``"error"`` raises a
            :class:`~aimkp.errors.DataError` naming it.
        progress: a ``tqdm``-like object (``update(n)``), or None.
    """
    if on_bad_record not in ("error", "skip"):
        raise UsageError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    counts = StreamCounts()
    done = done_ids or set()
    seen: set[str] = set()
    size = window or 8 * predictor.options.batch_size
    t0 = time.perf_counter()
    with predictor.session():
        for chunk in _windows(enumerate(posts), size):
            ready = []
            for index, post in chunk:
                sample = _admit(predictor, post, done, seen, counts, on_bad_record)
                if sample is None:
                    writer.write([(index, post, None)])
                else:
                    ready.append((index, post, sample))
            _predict_window(predictor, ready, writer, counts, progress)
    counts.seconds = time.perf_counter() - t0
    missing = len(done) - counts.resumed
    if missing:
        logger.warning(
            "the output holds %d prediction(s) for ids not in this input (another input?)",
            missing,
        )
    return counts


def _windows(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _admit(
    predictor: Predictor,
    post: Post,
    done: set[str],
    seen: set[str],
    counts: StreamCounts,
    on_bad_record: str,
) -> Any:
    """The post's encoded sample, or None when it is already written (resume) or rejected."""
    rid = post.record.id
    if rid in seen:
        return _reject(post, "duplicate id", f"id {rid!r} appears earlier", counts, on_bad_record)
    seen.add(rid)
    if rid in done:
        counts.resumed += 1
        return None
    try:
        return predictor.encode(post.record)
    except PostTooLong as exc:
        return _reject(post, "too long", str(exc), counts, on_bad_record)
    except DataError as exc:  # an image that went unreadable after it was read
        return _reject(post, "unreadable image", str(exc), counts, on_bad_record)


def _reject(post: Post, reason: str, why: str, counts: StreamCounts, on_bad_record: str) -> None:
    if not why.startswith(post.where):  # the adapter's length error names the post already
        why = f"{post.where}: {why}"
    if on_bad_record != "skip":
        raise DataError(f"{why} (--on-bad-record skip skips such posts)")
    counts.skipped.skip(reason, post.where)
    logger.warning("skipped %s: %s", post.where, why)


def _predict_window(
    predictor: Predictor,
    ready: list[tuple[int, Post, Any]],
    writer: Writer,
    counts: StreamCounts,
    progress: Any,
) -> None:
    ready.sort(key=lambda item: item[2].length)  # stable: equal lengths keep input order
    bs = predictor.options.batch_size
    for i in range(0, len(ready), bs):
        batch = ready[i : i + bs]
        texts = predictor.generate_batch([sample for _, _, sample in batch])
        writer.write([(index, post, text) for (index, post, _), text in zip(batch, texts)])
        counts.predicted += len(batch)
        if progress is not None:
            progress.update(len(batch))


def summary(counts: StreamCounts, reader: ReadStats, out: os.PathLike[str] | str) -> str:
    """The final line: predicted, skipped (by reason, first locations), resumed, rate."""
    skipped = ReadStats()
    skipped.merge(reader)
    skipped.merge(counts.skipped)
    reasons = "; ".join(
        f"{reason}: {n} [{', '.join(skipped.examples.get(reason, []))}]"
        for reason, n in sorted(skipped.skipped.items())
    )
    return (
        f"predicted {counts.predicted} posts, skipped {skipped.total_skipped}"
        + (f" ({reasons})" if reasons else "")
        + f", resumed {counts.resumed} (already in {out}) in {counts.seconds:.1f}s "
        f"({counts.posts_per_second:.2f} posts/s) -> {out}"
    )
