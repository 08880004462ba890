"""Scoring during training: greedy decoding on a split with the CMKP protocol, the majority and
untrained baselines, and the final test-split comparison table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from aimkp.eval.predict import Predictor
from aimkp.method.step import autocast_ctx
from aimkp.metrics.cmkp import score_cmkp
from aimkp.models import precision as P

if TYPE_CHECKING:
    from aimkp.data import Record
    from aimkp.models import LoadedModel
    from aimkp.train.config import TrainConfig

Scores = dict[str, float]


def majority_keyphrases(records: Sequence[Record], k: int = 5) -> list[str]:
    """The ``k`` most frequent training keyphrases (ties broken by first appearance)."""
    c = Counter(kp for r in records for kp in dict.fromkeys(r.keyphrases))
    return [kp for kp, _ in c.most_common(k)]


def score_predictions(preds: list[list[str]], records: Sequence[Record]) -> Scores:
    """CMKP-protocol F1@1, F1@3, MAP@5 (percent) plus their sum ``score``."""
    m = score_cmkp([r.text for r in records], [r.keyphrases for r in records], preds)
    out = {k: float(m[k]) for k in ("F1@1", "F1@3", "F1@5", "MAP@5") if k in m}
    out["score"] = out["F1@1"] + out["F1@3"] + out["MAP@5"]
    return out


def _eval_amp(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast for decoding: a half frozen base computes with fp32 trainable weights."""
    return P.autocast_dtype(P.resolve_dtype(cfg.dtype, device), cfg.bf16)


def evaluate(loaded: LoadedModel, records: Sequence[Record], cfg: TrainConfig) -> Scores:
    """Greedy decoding on ``records`` and CMKP scores; the model is left in train mode."""
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        pred = Predictor(loaded, decoding="greedy", max_new_tokens=cfg.max_new_tokens)
        with autocast_ctx(loaded.device, _eval_amp(cfg, loaded.device)):
            preds = pred.predict(list(records))
    finally:
        model.train(was_training)
    return score_predictions(preds, records)


def baseline_scores(
    loaded: LoadedModel,
    train_records: Sequence[Record],
    test_records: Sequence[Record],
    cfg: TrainConfig,
) -> dict[str, Scores]:
    """Test-split scores of the majority-keyphrase baseline and of the untrained model."""
    maj = majority_keyphrases(train_records)
    return {
        "majority": score_predictions([list(maj) for _ in test_records], test_records),
        "untrained": evaluate(loaded, test_records, cfg),
    }


def print_comparison(rows: dict[str, Scores], n: int) -> None:
    """Print the test-split table: majority baseline, untrained and trained model."""
    cols = ["F1@1", "F1@3", "F1@5", "MAP@5", "score"]
    print(f"\nTest split ({n} posts), CMKP protocol, percent; score = F1@1 + F1@3 + MAP@5")
    print(f"{'model':<16}" + "".join(f"{c:>9}" for c in cols))
    for name, m in rows.items():
        print(f"{name:<16}" + "".join(f"{m.get(c, float('nan')):>9.2f}" for c in cols))
    tr = rows.get("trained (best)", {}).get("score")
    if tr is not None:
        beats = all(tr > rows[k]["score"] for k in ("majority", "untrained") if k in rows)
        print(f"trained model beats both baselines: {'yes' if beats else 'NO'}\n", flush=True)
