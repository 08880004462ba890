"""The exception types that mark a *user* error (bad options, bad data, missing files).

The rule: code raises :class:`UsageError` (or its subclass :class:`DataError`) only where the
cause is something the user gave (a flag value, a path, a data file, a checkpoint directory) and
the message names it. ``aimkp.cli.main`` catches exactly these, prints one line on stderr and
exits 2. Every other exception (a ``ValueError`` from a kernel, a shape mismatch, a bug) is an
internal error and keeps its traceback. ``aimkp -v ...`` shows the traceback of user errors too.

Both subclass ``ValueError`` so callers (and tests) that caught ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["UsageError", "DataError", "CheckpointError", "NonFiniteError", "NONFINITE_EXIT"]


class UsageError(ValueError):
    """A user error: an option out of range, a missing path, an unusable model directory."""


class DataError(UsageError):
    """Malformed input data; the message starts with the file and the line (``f.jsonl:7: ...``)
    or record (``f.json: record 3: ...``)."""


class CheckpointError(UsageError):
    """A checkpoint or training-state file that cannot be (safely) read back."""


#: exit status of a run stopped by :class:`NonFiniteError`
NONFINITE_EXIT = 3


class NonFiniteError(RuntimeError):
    """Training stopped because values went non-finite (too many skipped steps in a row, or a
    non-finite weight about to be saved). Not a user error in the sense of :class:`UsageError`
    (the options may be fine and the data too), but not a bug either: ``aimkp.cli.main`` prints
    one line and exits :data:`NONFINITE_EXIT` (3)."""
