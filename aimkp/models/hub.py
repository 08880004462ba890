"""Hugging Face Hub ids (``llava-hf/llava-1.5-7b-hf``) resolved from the LOCAL cache only.

>>> resolve_hub_id("llava-hf/llava-1.5-7b-hf")   # -> .../models--llava-hf--llava-1.5-7b-hf/
...                                               #    snapshots/<hash>

huggingface_hub's own ``snapshot_download(local_files_only=True)`` reads the cache layout
(``models--org--name/refs/main`` -> ``snapshots/<hash>/``); nothing is ever downloaded, whether or
not ``HF_HUB_OFFLINE=1`` is set. The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
huggingface_hub's default, read when called (so a changed environment is honoured).
"""

from __future__ import annotations

import os
import pathlib
import re

from aimkp.errors import UsageError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(spec: str) -> bool:
    """``"org/name"`` with hub-legal characters (a relative path ``runs/best`` looks alike)."""
    return bool(_HUB_ID.fullmatch(spec)) and ".." not in spec


def hub_cache_dir() -> pathlib.Path:
    """The cache directory huggingface_hub would read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return pathlib.Path(constants.HF_HUB_CACHE)


def resolve_hub_id(hub_id: str, revision: str | None = None) -> pathlib.Path:
    """The local snapshot directory of ``hub_id`` (ValueError, one line, when not cached)."""
    cache = hub_cache_dir()
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on huggingface_hub
        raise UsageError(f"hub id {hub_id!r} needs huggingface_hub ({exc})") from exc
    try:
        path = snapshot_download(hub_id, revision=revision, cache_dir=cache, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, bad ids, ...: all mean "not usable here"
        raise UsageError(
            f"model {hub_id!r} is not in the local Hugging Face cache {cache} (nothing is "
            f"downloaded: fetch it there first, e.g. `hf download {hub_id}` on a connected "
            f"machine, or pass a local directory) [{type(exc).__name__}]"
        ) from None
    return pathlib.Path(path)
