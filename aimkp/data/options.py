"""The reader options a command passes to :func:`aimkp.data.load_dataset` for a dataset spec."""

from __future__ import annotations

from typing import Any

ON_MISSING_IMAGE = ("error", "skip")
ON_BAD_RECORD = ("error", "skip")


def is_synthetic(spec: str) -> bool:
    """True for ``synthetic[:SEED]`` / ``synthetic-split[:SEED[:P]]`` (generated, no files)."""
    return spec.partition(":")[0] in ("synthetic", "synthetic-split")


def reader_options(
    spec: str,
    *,
    image_dir: str | None = None,
    on_missing_image: str = "error",
    on_bad_record: str = "error",
    with_images: bool = True,
) -> dict[str, Any]:
    """Keyword arguments of :func:`aimkp.data.iter_records` for ``spec`` (none for synthetic
    data, which reads no file)."""
    if is_synthetic(spec):
        return {}
    return {
        "image_dir": image_dir,
        "on_missing_image": on_missing_image,
        "on_bad_record": on_bad_record,
        "with_images": with_images,
    }
