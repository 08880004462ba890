"""The output-directory policy: nothing of the user's is overwritten.

One rule per kind of output, each checked by the CLI before any work (nothing is created here):

- a run directory (``aimkp train --output``, :func:`check_run_output`): new or empty, or the run
  being resumed (``--resume`` naming it). A directory holding a run is refused without
  ``--resume`` (its ``config.json``, ``metrics.csv`` and ``last/`` would be replaced while an old
  ``best/`` stayed, a run that no longer matches its config); any other non-empty directory
  (``--output .``, a home directory, ``/``) is refused too.
- a model directory written whole (``aimkp export --output``, :func:`check_new_model_dir`): new or
  empty, and neither inside a checkpoint nor a run directory's own ``base/``, ``best/``,
  ``last/`` (an export into ``base/`` would make ``best/`` and ``last/`` apply their LoRA twice).
- a file written from a checkpoint (``aimkp predict --out``, :func:`check_output_outside`): not
  inside the checkpoint it reads, nor inside a run directory's checkpoints.

Every refusal is a :class:`~aimkp.errors.UsageError` naming the flag, the path and what to do.
"""

from __future__ import annotations

import os
import pathlib

from aimkp.errors import UsageError
from aimkp.runs.lock import LOCK_FILE, check_not_in_use

#: entries that mark a directory as an aimkp run directory
RUN_MARKERS = ("config.json", "metrics.csv", "last", "best")
#: a run directory's checkpoint subdirectories (``step-NNNNNN`` too)
RUN_CHECKPOINTS = ("base", "best", "last")
#: entries that mark a directory as a model checkpoint
CHECKPOINT_MARKERS = ("adapter_config.json", "aimkp.json", "model.safetensors", "train_state.pt")

__all__ = [
    "check_new_dir",
    "check_not_an_input",
    "check_new_model_dir",
    "check_output_outside",
    "check_run_output",
    "is_run_dir",
    "looks_like_checkpoint",
]


def is_run_dir(path: pathlib.Path) -> bool:
    """True when ``path`` holds an aimkp training run (its config, metrics or checkpoints)."""
    return path.is_dir() and (
        any((path / m).exists() for m in RUN_MARKERS) and not looks_like_checkpoint(path)
    )


def looks_like_checkpoint(path: pathlib.Path) -> bool:
    """True when ``path`` holds a model checkpoint (adapter, full weights, training state)."""
    return path.is_dir() and any((path / m).exists() for m in CHECKPOINT_MARKERS)


def _entries(path: pathlib.Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise UsageError(f"{path}: cannot be listed ({exc.strerror})") from None


def _resolved(path: str | os.PathLike[str]) -> pathlib.Path:
    return pathlib.Path(path).expanduser().resolve()


def _is_filesystem_root(p: pathlib.Path) -> bool:
    return p == pathlib.Path(p.anchor)


def _run_dir_of(resume: str | os.PathLike[str]) -> pathlib.Path:
    """The run directory ``--resume`` names (its ``last/`` or the run directory itself)."""
    p = _resolved(resume)
    return p.parent if p.name == "last" else p


def check_run_output(
    output: str | os.PathLike[str], resume: str | os.PathLike[str] | None = None
) -> pathlib.Path:
    """``aimkp train --output``: new, empty, or the run ``--resume`` continues."""
    p = _resolved(output)
    if _is_filesystem_root(p):
        raise UsageError(f"--output {output}: is the root of the file system; name a run directory")
    if not p.exists() or not p.is_dir():  # a file there: the creatability check names it
        return p
    check_not_in_use(p)  # a live run's lock: named as such
    entries = [e for e in _entries(p) if e != LOCK_FILE]  # a stale lock is taken over
    if not entries:
        return p
    if resume is not None and _run_dir_of(resume) == p:
        return p
    if is_run_dir(p):
        hint = (
            f"continue it with --resume {output}"
            if (p / "last").is_dir()
            else "it has no last/ checkpoint to resume from; remove it"
        )
        what = "a different run is resumed (--resume " + str(resume) + ")" if resume else ""
        raise UsageError(
            f"--output {output}: holds a training run already"
            + (f" while {what}" if what else "")
            + f" (its {', '.join(m for m in RUN_MARKERS if (p / m).exists())}); {hint}, "
            "or choose a new --output"
        )
    raise UsageError(
        f"--output {output}: is not empty and holds no aimkp run ({len(entries)} entries, e.g. "
        f"{entries[0]!r}); a run writes config.json, metrics.csv, best/ and last/ there: "
        "choose a new or empty directory"
    )


def _enclosing_checkpoint(p: pathlib.Path) -> pathlib.Path | None:
    """``p`` or the nearest directory above it that is a checkpoint or a run's checkpoint dir."""
    for d in (p, *p.parents):
        if looks_like_checkpoint(d):
            return d
        if d.name in RUN_CHECKPOINTS and is_run_dir(d.parent):
            return d
        if d.name.startswith("step-") and is_run_dir(d.parent):
            return d
    return None


def check_new_model_dir(
    output: str | os.PathLike[str], source: str | os.PathLike[str], flag: str = "--output"
) -> pathlib.Path:
    """A model directory written whole from the checkpoint ``source``: new or empty, not inside
    ``source``, nor in (or inside) any checkpoint or a run's ``base/``, ``best/``, ``last/``."""
    p = _resolved(output)
    src = _resolved(source) if pathlib.Path(source).exists() else None
    if src is not None and (p == src or src in p.parents):
        raise UsageError(f"{flag} {output}: is inside the checkpoint {source} it is made from")
    inside = _enclosing_checkpoint(p)
    if inside is not None:
        raise UsageError(
            f"{flag} {output}: is inside the checkpoint {inside} (writing there would change "
            "what it loads); choose a directory outside any checkpoint"
        )
    if p.is_dir() and _entries(p):
        raise UsageError(
            f"{flag} {output}: is not empty; the model directory is written whole: choose a new "
            "or empty directory"
        )
    return p


def check_output_outside(
    output: str | os.PathLike[str], checkpoint: str | os.PathLike[str], flag: str
) -> pathlib.Path:
    """A file or report directory made from ``checkpoint``: not inside it, nor inside any other
    checkpoint or a run's checkpoint directories (``predict --out``, ``evaluate --output``)."""
    p = _resolved(output)
    ck = _resolved(checkpoint) if pathlib.Path(checkpoint).exists() else None
    if ck is not None and (p == ck or ck in p.parents):
        raise UsageError(f"{flag} {output}: is inside the checkpoint {checkpoint} it is made from")
    inside = _enclosing_checkpoint(p if p.is_dir() else p.parent)
    if inside is not None:
        raise UsageError(
            f"{flag} {output}: is inside the checkpoint {inside}; write it outside any checkpoint"
        )
    return p


def check_new_dir(output: str | os.PathLike[str], flag: str, what: str) -> pathlib.Path:
    """A directory written whole (``aimkp data convert --to hf --out``): new or empty."""
    p = _resolved(output)
    if p.is_dir() and _entries(p):
        raise UsageError(
            f"{flag} {output}: is not empty; {what} is written whole: choose a new or empty "
            "directory"
        )
    return p


def check_not_an_input(
    output: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], flag: str
) -> pathlib.Path:
    """An output file that is none of the command's input files (``aimkp data convert --data
    posts.jsonl --out posts.jsonl`` would replace the data it reads)."""
    p = _resolved(output)
    for src in inputs:
        if pathlib.Path(src).exists() and (_resolved(src) == p or _resolved(src) in p.parents):
            raise UsageError(f"{flag} {output}: is the input {src}; write to another file")
    return p
