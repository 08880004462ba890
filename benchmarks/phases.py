"""Time the phases of the real AimKP step from the spans it opens itself (nothing re-implemented,
nothing patched).

While :func:`instrumented` is active, these spans are recorded (the step's own
:func:`aimkp.spans.span` s, plus forward hooks on three modules):

- ``collate``: the ``plan_rows`` span (rows, keep masks, collated batch);
- ``embedding_masking``: the span around the fused masked-embedding op in the row forward (the
  op, or the ``MaskedEmbedding`` module when the table is trainable);
- ``vision_tower`` / ``projector`` / ``language_model``: forward pre/post hooks on the adapter's
  modules (the language model is called on ready embeddings, so it does not contain the
  embedding; the projector runs after the tower, outside it);
- ``forward``: the row forward as a whole; ``head_loss`` is what it spends outside the four
  spans above (lm_head, cross-entropy, scatter of padded rows);
- ``forward_backward``: the row forward and its backward; ``backward`` is it minus ``forward``
  (autograd, with the engine's backward hooks when the engine is on);
- ``step``: the whole ``aimkp_step`` call; ``filter_reweight`` is it minus ``collate`` and
  ``forward_backward`` (engine enter / exit, ``gf.decide``, ``gram.reweight``, the checks).

Every derived phase is a difference of nested spans of the same run, so no time is counted twice.
The engine's per-row gradient work is split off ``backward`` by difference against a plain
backward over the same rows (see :mod:`bench_breakdown`). The engine's forward hooks (saving
each layer's input for the per-row products) stay inside the forward spans.

Timing: CUDA events on a GPU (read after one synchronize at the end of the step); on the CPU,
``time.perf_counter`` (every op there is synchronous).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch

from aimkp.spans import listening


class Spans:
    """Start / end marks of named spans; :meth:`totals` sums each name's spans in ms."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list[tuple[str, Any, Any]] = []
        self.open: dict[str, list[Any]] = defaultdict(list)

    def now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        self.open[name].append(self.now())

    def stop(self, name: str) -> None:
        self.marks.append((name, self.open[name].pop(), self.now()))

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = defaultdict(float)
        for name, a, b in self.marks:
            out[name] += a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return dict(out)


#: The step's span names (:mod:`aimkp.spans`) -> the names of the phases they time.
STEP_SPANS = {
    "plan_rows": "collate",
    "embedding_masking": "embedding_masking",
    "forward": "forward",
    "forward_backward": "forward_backward",
    "step": "step",
}


def _hook_module(stack: contextlib.ExitStack, module: torch.nn.Module, name: str, spans: Spans):
    pre = module.register_forward_pre_hook(lambda *_: spans.start(name))
    post = module.register_forward_hook(lambda *_: spans.stop(name))
    stack.callback(pre.remove)
    stack.callback(post.remove)


@contextlib.contextmanager
def instrumented(loaded: Any, spans: Spans) -> Iterator[Spans]:
    """Record the spans of every step run inside (module docstring) into ``spans``."""

    def on_span(name: str, event: str) -> None:
        if name in STEP_SPANS:
            (spans.start if event == "start" else spans.stop)(STEP_SPANS[name])

    adapter = loaded.adapter
    with contextlib.ExitStack() as stack:
        stack.enter_context(listening(on_span))
        for name in ("vision_tower", "projector", "language_model"):
            _hook_module(stack, getattr(adapter, name), name, spans)
        yield spans


def step_phases(totals: dict[str, float]) -> dict[str, float]:
    """The disjoint phases (ms) of one instrumented ``aimkp_step`` (or a plain forward_backward
    when there is no ``step`` span) from its span totals."""
    get = totals.get
    inner = ("embedding_masking", "vision_tower", "projector", "language_model")
    phases = {k: get(k, 0.0) for k in ("collate", *inner)}
    phases["head_loss"] = get("forward", 0.0) - sum(phases[k] for k in inner)
    phases["backward"] = get("forward_backward", 0.0) - get("forward", 0.0)
    if "step" in totals:
        phases["filter_reweight"] = (
            totals["step"] - get("collate", 0.0) - totals["forward_backward"]
        )
    return phases
