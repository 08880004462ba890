"""The posts a training run reads: its train / valid / test splits, read as its config says.

``--valid-data`` replaces the validation split of ``--data``; when ``--data`` is one file (allowed
only with ``--valid-data``, see :meth:`TrainConfig.validate`), the file is the training split and
the validation data also serves as the test split of ``--baselines``, so no score of a run is ever
measured on its training posts.
"""

from __future__ import annotations

import pathlib
import sys

from aimkp.data import Record, load_dataset
from aimkp.data.options import reader_options
from aimkp.errors import DataError
from aimkp.train.config import TrainConfig


def split_spec(cfg: TrainConfig, split: str) -> str:
    """The dataset spec to read ``split`` from."""
    single_file = pathlib.Path(cfg.data).expanduser().is_file()
    if cfg.valid_data is not None and (split == "valid" or (split == "test" and single_file)):
        return cfg.valid_data
    return cfg.data


def load_split(cfg: TrainConfig, split: str) -> list[Record]:
    """The records of ``split``; skipped posts (``--on-missing-image skip``, ``--on-bad-record
    skip``) are counted in a line on stderr."""
    spec = split_spec(cfg, split)
    opts = reader_options(
        spec,
        image_dir=cfg.image_dir,
        on_missing_image=cfg.on_missing_image,
        on_bad_record=cfg.on_bad_record,
    )
    recs = load_dataset(spec, split, **opts)
    if recs.stats.total_skipped:
        print(f"[aimkp train] {split}: {recs.stats.summary()}", file=sys.stderr, flush=True)
    if split == "train" and not recs:
        raise DataError(f"{recs.stats.summary()}: no training records")
    return list(recs)
