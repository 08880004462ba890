"""Which backend ran: every op records the backend it actually used, so callers can check.

``last_backend("masked_embedding")`` returns ``"triton"``, ``"cpp"``, ``"cuda"`` or
``"reference"`` (or None before the first call). Each record is also logged at DEBUG level on the
``aimkp.ops`` logger.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("aimkp.ops")

_LOCK = threading.Lock()
_LAST: dict[str, str] = {}


def record_backend(op: str, backend: str) -> None:
    """Remember that ``op`` just ran on ``backend`` and log it at DEBUG level."""
    with _LOCK:
        _LAST[op] = backend
    logger.debug("aimkp.ops.%s: backend=%s", op, backend)


def last_backend(op: str) -> str | None:
    """The backend the last call of ``op`` ran on (None when ``op`` has not run yet)."""
    with _LOCK:
        return _LAST.get(op)


def reset_backends() -> None:
    """Forget every record (tests use it to be sure a record comes from their own call)."""
    with _LOCK:
        _LAST.clear()
