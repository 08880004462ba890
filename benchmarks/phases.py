"""Time the phases of the real AimKP step by instrumenting its code path (nothing re-implemented).

While :func:`instrumented` is active, spans are recorded around:

- ``collate``: ``aimkp.method.step.plan_rows`` (rows, keep masks, collated batch);
- ``embedding_masking``: the fused masked-embedding op (the ``aimkp.models.forward`` global, or
  forward pre/post hooks on a ``MaskedEmbedding`` module when the table is trainable);
- ``vision_tower`` / ``projector`` / ``language_model``: forward pre/post hooks on the adapter's
  modules (the language model is called on ready embeddings, so it does not contain the
  embedding; the projector runs after the tower, outside it);
- ``forward``: ``aimkp.models.forward_rows`` as a whole; ``head_loss`` is what it spends outside
  the four spans above (lm_head, cross-entropy, scatter of padded rows);
- ``forward_backward``: ``aimkp.method.step.forward_backward``; ``backward`` is it minus
  ``forward`` (autograd, with the engine's backward hooks when the engine is on);
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
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch


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

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.start(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(name)

        return timed


@contextlib.contextmanager
def _patched(obj: Any, attr: str, value: Any) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def _hook_module(stack: contextlib.ExitStack, module: torch.nn.Module, name: str, spans: Spans):
    pre = module.register_forward_pre_hook(lambda *_: spans.start(name))
    post = module.register_forward_hook(lambda *_: spans.stop(name))
    stack.callback(pre.remove)
    stack.callback(post.remove)


@contextlib.contextmanager
def instrumented(loaded: Any, spans: Spans) -> Iterator[Spans]:
    """Record the spans of every step run inside (module docstring) into ``spans``."""
    import aimkp.method.step as step
    import aimkp.models
    import aimkp.models.forward as fwd
    from aimkp.ops import MaskedEmbedding

    adapter = loaded.adapter
    with contextlib.ExitStack() as stack:
        for obj, attr, name in [
            (step, "plan_rows", "collate"),
            (step, "forward_backward", "forward_backward"),
            (step, "aimkp_step", "step"),
            (aimkp.models, "forward_rows", "forward"),
            (fwd, "masked_embedding", "embedding_masking"),
        ]:
            stack.enter_context(_patched(obj, attr, spans.wrap(name, getattr(obj, attr))))
        modules = {
            "vision_tower": adapter.vision_tower,
            "projector": adapter.projector,
            "language_model": adapter.language_model,
        }
        if isinstance(adapter.embed_tokens, MaskedEmbedding):
            modules["embedding_masking"] = adapter.embed_tokens
        for name, module in modules.items():
            _hook_module(stack, module, name, spans)
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
