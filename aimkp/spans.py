"""Named spans and taps the training step opens on itself, for profilers, benchmarks and tests.

``span(name)`` marks a phase of the step (``step``, ``plan_rows``, ``forward_backward``,
``forward``, ``correction``, ``embedding_masking``): it opens a
``torch.profiler.record_function("aimkp.<name>")`` range (seen by ``torch.profiler``) and tells
the listeners registered with :func:`listening` when the phase starts and ends. The phase
breakdown benchmark (``benchmarks/phases.py``) times the step this way; nothing depends on where
a module imports its helpers.

``tap(name, value)`` hands a value the step computed to the functions registered with
:func:`tapping`, which may replace it; the step uses what they return. The taps:

- ``row_losses``: the :class:`aimkp.models.RowLosses` of each row forward, before its backward
  (the tests make one row's loss non-finite through it, to check that the row is excluded
  exactly);
- ``grad_gram``: the engine's constructor, :func:`aimkp.engine.per_sample_grad_gram` (the memory
  benchmark wraps it to choose the engine's reweight storage and measure its stash);
- ``grads_finite``: the training loop's verdict (a bool) that an optimizer step's summed
  gradient is finite, from the run's parallel strategy (data parallel or ``--fsdp``'s sharded
  check); the tests force skipped steps through it.

With nothing registered a span costs a ``record_function`` range and a tap nothing.

>>> marks = []
>>> with listening(lambda name, event: marks.append((name, event))):
...     with span("forward"):
...         pass
>>> marks
[('forward', 'start'), ('forward', 'end')]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

import torch

__all__ = ["Listener", "listening", "span", "tap", "tapping"]

#: ``listener(name, event)``: a span ``name`` starts or ends.
Listener = Callable[[str, Literal["start", "end"]], None]

T = TypeVar("T")

_listeners: list[Listener] = []
_taps: dict[str, list[Callable]] = {}


@contextlib.contextmanager
def span(name: str) -> Iterator[None]:
    """The phase ``name`` of the step: a profiler range ``aimkp.<name>`` and, to every listener,
    ``(name, "start")`` before and ``(name, "end")`` after (also when the phase raises)."""
    with torch.profiler.record_function(f"aimkp.{name}"):
        for listener in tuple(_listeners):
            listener(name, "start")
        try:
            yield
        finally:
            for listener in tuple(_listeners):
                listener(name, "end")


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[Listener]:
    """Register ``listener`` for every span opened inside the ``with`` block."""
    _listeners.append(listener)
    try:
        yield listener
    finally:
        _listeners.remove(listener)


def tap(name: str, value: T) -> T:
    """``value`` passed through the functions registered for ``name`` (in registration order)."""
    for fn in tuple(_taps.get(name, ())):
        value = fn(value)
    return value


@contextlib.contextmanager
def tapping(name: str, fn: Callable[[T], T]) -> Iterator[None]:
    """Register ``fn`` on the tap ``name`` inside the ``with`` block."""
    _taps.setdefault(name, []).append(fn)
    try:
        yield
    finally:
        _taps[name].remove(fn)
