"""SIGINT / SIGTERM during training: finish the current optimizer step, save ``OUTPUT/last``,
say how to resume and exit 130 / 143 (128 + the signal's number, the shell's convention).

The handler only records the signal; the loop looks at it after each optimizer step
(:meth:`StopRequest.agreed`, the same answer on every rank under torchrun: the loop passes
``DistContext.any_rank``, the all-reduce of the training package). A second SIGINT raises
``KeyboardInterrupt`` at once (``last`` then keeps its previous, whole, state).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Records SIGINT / SIGTERM while installed (a context manager; handlers restored after)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal() needs it
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _record(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, any_rank: Callable[[bool], bool]) -> int | None:
        """The signal to stop for if any rank got one (this rank's, else SIGTERM), else None.

        ``any_rank(flag)``: whether ``flag`` is true on any rank, the same answer on every rank
        (``flag`` itself in a single process)."""
        if not any_rank(self.signum is not None):
            return None
        return self.signum or int(signal.SIGTERM)


def exit_status(signum: int) -> int:
    """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)
