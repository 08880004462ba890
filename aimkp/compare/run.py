"""``aimkp compare``: train every method x seed, evaluate each best checkpoint, compare honestly.

Runs live in ``OUT/runs/<method>/e<epochs>-s<seed>/`` (the training loop's run directory); a run
whose ``result.json`` exists with the same config is not trained again, a run stopped part-way
(killed, Ctrl-C) continues from its last step checkpoint (``<run>/last``, written every
``save_every`` optimizer steps and at each epoch's end: the loop's ``--resume``), and each
robustness setting's predictions are cached in ``<run>/eval/<setting>/``, so an interrupted or
extended comparison (more seeds, more settings) redoes only what is missing.

The same seed gives every method the same initial weights and the same data order (the loop
seeds the model with ``seed`` and permutes with ``seed + epoch``).

Budgets:

- ``epochs``: every method trains ``epochs`` epochs.
- ``tokens``: the AimKP methods train ``epochs`` epochs; the plain fine-tuning methods then train
  ``round(B / t)`` epochs (at least ``epochs``), ``B`` the largest number of tokens an AimKP run of
  that seed trained (every input token of every row, masked copies included: the loop's
  ``tokens_per_s * epoch_s``), ``t`` one plain epoch's tokens: AimKP's first epoch, which builds
  no copy (every stride starts at 1), trains exactly the originals. Whole epochs keep the loop's
  schedule intact, so the totals match to within half a plain epoch; compare.json lists each
  run's trained tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aimkp.compare.methods import Method
from aimkp.errors import CheckpointError, UsageError
from aimkp.runs.state import find_train_state
from aimkp.train.config import TrainConfig

log = logging.getLogger("aimkp.compare")

BUDGETS = ("epochs", "tokens")
DEFAULT_SETTINGS = ("clean", "text_only", "image_only", "text_hidden", "image_hidden", "misaligned")
RESULT = "result.json"


@dataclass
class CompareSpec:
    """What to compare: methods (the first is the reference), seeds, settings, the shared
    training fields ``base`` (TrainConfig fields), the budget and where to write."""

    methods: list[Method]
    seeds: list[int]
    settings: list[str]
    base: dict[str, Any]
    epochs: int
    budget: str = "epochs"
    output: str = "runs/compare"
    n_boot: int = 1000
    boot_seed: int = 0
    plot: bool = True
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def trained_tokens(history: Sequence[dict[str, Any]]) -> int:
    """Input tokens a run trained (all rows, masked copies included) from its history rows."""
    return int(round(sum(float(h["tokens_per_s"]) * float(h["epoch_s"]) for h in history)))


def run_config(spec: CompareSpec, method: Method, seed: int, epochs: int) -> TrainConfig:
    """The TrainConfig of one run (validated; ValueError names a bad option)."""
    fields = {**spec.base, **method.options}
    fields.update(
        method=method.method,
        seed=seed,
        epochs=epochs,
        output=str(run_dir(spec, method, seed, epochs)),
        baselines=False,  # the comparison scores the test split itself
        eval_every_epoch=True,  # the best checkpoint is picked on valid
        resume=None,
        stop_after_epochs=None,
    )
    try:
        return TrainConfig(**fields).validate()
    except (TypeError, ValueError) as exc:
        raise UsageError(f"method {method.label!r}: {exc}") from None


def run_dir(spec: CompareSpec, method: Method, seed: int, epochs: int) -> Path:
    return Path(spec.output) / "runs" / method.slug / f"e{epochs}-s{seed}"


# How often a run saved does not change what it trained: a comparison made before step
# checkpoints existed (save_every None) is still reused by one that writes them.
NOT_DEFINING = ("save_every", "keep_last")


def _defining(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_DEFINING}


def _read_result(path: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    f = path / RESULT
    if not f.is_file():
        return None
    res = json.loads(f.read_text())
    if _defining(res.get("config") or {}) != _defining(cfg.to_dict()):
        raise UsageError(
            f"{path} holds a finished run with another configuration; use another --output "
            "or delete it"
        )
    return res


def resumable(out: Path) -> bool:
    """True when run directory ``out`` holds a step / epoch checkpoint to continue from."""
    try:
        find_train_state(out)
    except CheckpointError:
        return False
    return True


def train_run(cfg: TrainConfig, label: str) -> dict[str, Any]:
    """Train one run (or read its result when finished): ``result.json``'s content. A run that
    stopped part-way continues from its ``last`` checkpoint (the loop refuses, naming them, any
    option that differs from the saved run's); ``train_s`` counts this invocation only."""
    out = Path(cfg.output)
    done = _read_result(out, cfg)
    if done is not None:
        log.info("%s seed %d: finished before, not trained again", label, cfg.seed)
        return done
    from aimkp.train.loop import train

    t0 = time.perf_counter()
    resumed = resumable(out)
    if resumed:
        log.info("%s seed %d: continuing from %s", label, cfg.seed, out / "last")
        summary = train(dataclasses.replace(cfg, resume=str(out)))
    else:
        summary = train(cfg)
    res = {
        "label": label,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "config": cfg.to_dict(),
        "train_s": round(time.perf_counter() - t0, 2),
        "resumed": resumed,
        "trained_tokens": trained_tokens(summary["history"]),
        "first_epoch_tokens": trained_tokens(summary["history"][:1]),
        "best_epoch": summary["best_epoch"],
        "best_valid_score": summary["best_score"],
        "history": summary["history"],
    }
    if summary["best_epoch"] is None:
        raise UsageError(f"{label} seed {cfg.seed}: no best checkpoint (empty validation split?)")
    (out / RESULT).write_text(json.dumps(res, indent=1) + "\n")
    return res


def evaluate_run(cfg: TrainConfig, settings: Sequence[str], test_records: list[Any]) -> float:
    """Robustness predictions of the run's best checkpoint for every setting not yet cached
    (``<run>/eval/<setting>/``); returns the seconds spent."""
    from aimkp.eval.hidden import predict_fn_for
    from aimkp.eval.predict import load_predictor
    from aimkp.eval.robustness import run_robustness

    root = Path(cfg.output) / "eval"
    todo = [s for s in settings if not (root / s / "robustness.json").is_file()]
    if not todo:
        return 0.0
    t0 = time.perf_counter()
    if cfg.num_threads is not None:
        import torch

        torch.set_num_threads(cfg.num_threads)
    predictor = load_predictor(
        str(Path(cfg.output) / "best"), device=cfg.device, max_new_tokens=cfg.max_new_tokens
    )
    fn = predict_fn_for(predictor)
    for s in todo:
        run_robustness(fn, test_records, settings=[s], out_dir=root / s, plot=False)
    return time.perf_counter() - t0


def _plan_epochs(spec: CompareSpec, method: Method, done: dict[str, dict[str, Any]]) -> int:
    """Epochs of ``method`` for one seed, given that seed's finished AimKP runs ``done``."""
    if spec.budget == "epochs" or method.method != "sft":
        return spec.epochs
    aim = [r for r in done.values() if r["config"]["method"] != "sft"]
    budget = max(r["trained_tokens"] for r in aim)
    per_epoch = aim[0]["first_epoch_tokens"]
    return max(spec.epochs, int(round(budget / max(1, per_epoch))))


def run_order(spec: CompareSpec) -> list[Method]:
    """AimKP methods first under the token budget (the plain runs' epochs depend on them)."""
    if spec.budget == "tokens":
        return [m for m in spec.methods if m.method != "sft"] + [
            m for m in spec.methods if m.method == "sft"
        ]
    return list(spec.methods)


def check_spec(spec: CompareSpec) -> None:
    """User errors before any training: ValueError naming the first problem."""
    if spec.budget not in BUDGETS:
        raise UsageError(f"budget must be one of {BUDGETS}, got {spec.budget!r}")
    if not spec.seeds:
        raise UsageError("seeds must be >= 1")
    if spec.n_boot < 1:
        raise UsageError(f"bootstrap replicates must be >= 1, got {spec.n_boot}")
    if spec.budget == "tokens" and all(m.method == "sft" for m in spec.methods):
        raise UsageError("--budget tokens needs at least one aimkp method to set the budget")
    for m in spec.methods:
        run_config(spec, m, spec.seeds[0], spec.epochs)


def run_all(
    spec: CompareSpec, progress: Callable[..., Any] | None = None
) -> dict[str, dict[int, dict[str, Any]]]:
    """Train and evaluate every (method, seed); ``{label: {seed: result}}``."""
    from tqdm.auto import tqdm

    from aimkp.data import load_dataset

    check_spec(spec)
    test = list(load_dataset(spec.base.get("data", "default"), "test"))
    test = test[: spec.base.get("eval_max_samples")]
    if not test:
        raise UsageError("the test split is empty")
    order = run_order(spec)
    bar = (progress or tqdm)(total=len(order) * len(spec.seeds), desc="compare runs")
    results: dict[str, dict[int, dict[str, Any]]] = {m.label: {} for m in spec.methods}
    for seed in spec.seeds:
        done: dict[str, dict[str, Any]] = {}
        for m in order:
            bar.set_postfix_str(f"{m.label} seed {seed}")
            cfg = run_config(spec, m, seed, _plan_epochs(spec, m, done))
            res = train_run(cfg, m.label)
            evaluate_run(cfg, spec.settings, test)
            res["dir"] = cfg.output
            done[m.label] = results[m.label][seed] = res
            bar.update(1)
    bar.close()
    return results
