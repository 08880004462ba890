"""Keyphrase scoring under the two evaluation protocols used for MKP results (CMKP's and
AimKP's; see the two modules).

>>> from aimkp.metrics import score
>>> score(records, predictions, protocol="cmkp")["F1@1"]      # percent

- ``protocol="cmkp"`` (default): :func:`aimkp.metrics.cmkp.score_cmkp`, with present / absent.
- ``protocol="aimkp"``: :func:`aimkp.metrics.aimkp_protocol.score_aimkp`.

Both report ``F1@1``, ``F1@3``, ``F1@5``, ``MAP@5``, ``NDCG@5`` (and P@k, R@k) in percent; the
same predictions give different numbers under the two, so every result names its protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aimkp.errors import DataError, UsageError

from .aimkp_protocol import score_aimkp
from .cmkp import score_cmkp
from .stem import stem_phrase, stem_word

if TYPE_CHECKING:
    from aimkp.data import Record

__all__ = [
    "PROTOCOLS",
    "HEADLINE",
    "score",
    "score_cmkp",
    "score_aimkp",
    "parse_prediction_line",
    "read_predictions",
    "stem_word",
    "stem_phrase",
]

PROTOCOLS = ("cmkp", "aimkp")
HEADLINE = ("F1@1", "F1@3", "F1@5", "MAP@5", "NDCG@5")


def parse_prediction_line(line: str) -> list[str]:
    """One prediction line -> ranked phrases: split on ``;``, or on ``,`` when there is no ``;``.

    ``"wildflower hour;gardens hour"`` -> ``["wildflower hour", "gardens hour"]``;
    ``"a, b"`` -> ``["a", "b"]``; an empty line -> ``[]``.
    """
    line = line.strip()
    if not line:
        return []
    sep = ";" if ";" in line else ","
    return [p.strip() for p in line.split(sep) if p.strip()]


def read_predictions(path: str) -> list[list[str]]:
    """Read a prediction file (one line per post, phrases ranked) into ``[N][*]`` phrases."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read predictions: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None
    return [parse_prediction_line(line) for line in text.splitlines()]


def score(
    records: Sequence[Record],
    predictions: Sequence[Sequence[str]],
    protocol: str = "cmkp",
) -> dict:
    """Score ``predictions[i]`` (ranked phrases) against ``records[i].keyphrases``.

    Args:
        records: ``[N]`` records (``text`` is used by the CMKP present/absent split).
        predictions: ``[N][*]`` ranked phrases.
        protocol: ``"cmkp"`` or ``"aimkp"``.
    """
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if len(records) != len(predictions):
        raise DataError(f"{len(predictions)} prediction lists for {len(records)} records")
    targets = [r.keyphrases for r in records]
    if protocol == "cmkp":
        return score_cmkp([r.text for r in records], targets, predictions)
    return score_aimkp(targets, predictions)
