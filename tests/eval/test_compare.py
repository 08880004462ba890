"""``aimkp compare`` end to end at a tiny size: structure, numbers, resume, budgets, user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aimkp.cli import main
from aimkp.data import load_dataset
from aimkp.eval import stats
from aimkp.metrics import read_predictions
from aimkp.metrics.cmkp import score_cmkp

DATA = "synthetic-split:1:0.9"
TINY = [
    "--data",
    DATA,
    "--preset",
    "tiny-llava",
    "--max-train-samples",
    "12",
    "--eval-max-samples",
    "6",
    "--batch-size",
    "4",
    "--max-new-tokens",
    "5",
    "--threads",
    "1",
    "--no-plot",
]
SETTINGS = "clean,text_only,text_hidden"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    argv = [
        "compare",
        *TINY,
        "--methods",
        "sft,aimkp",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--settings",
        SETTINGS,
        "--bootstrap",
        "50",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    return out, argv, json.loads((out / "compare.json").read_text())


def _test_records():
    return list(load_dataset(DATA, "test"))[:6]


def _preds(rep, method: str, seed: int, setting: str) -> list[list[str]]:
    d = rep["runs"][method][str(seed)]["dir"]
    p = read_predictions(f"{d}/eval/{setting}/predictions/{setting}.txt")
    return p + [[] for _ in range(6 - len(p))]


def test_structure(compared) -> None:
    out, _, rep = compared
    assert (out / "compare.md").is_file()
    assert rep["methods"] == ["sft", "aimkp"] and rep["base"] == "sft"
    assert rep["seeds"] == [0, 1] and rep["settings"] == SETTINGS.split(",")
    assert rep["n_test_posts"] == 6 and rep["budget"] == "epochs"
    for m in rep["methods"]:
        assert set(rep["runs"][m]) == {"0", "1"}
        for seed, run in rep["runs"][m].items():
            assert run["epochs"] == 1 and run["trained_tokens"] > 0 and run["train_s"] > 0
            lines = {";".join(p) for p in _preds(rep, m, int(seed), "clean")}
            assert run["distinct_predictions"]["clean"] == len(lines)
        assert rep["per_method"][m]["wall_s"] > 0
        for s in rep["settings"]:
            assert set(rep["results"][s][m]) == set(stats.METRICS)
    assert "diff" in rep["results"]["clean"]["aimkp"]["score"]
    assert "diff" not in rep["results"]["clean"]["sft"]["score"]
    # one AimKP epoch builds no masked copy: the same tokens as plain fine-tuning
    assert rep["runs"]["aimkp"]["0"]["trained_tokens"] == rep["runs"]["sft"]["0"]["trained_tokens"]


def test_numbers_are_the_protocol_the_interval_and_the_bootstrap(compared) -> None:
    _, _, rep = compared
    recs = _test_records()
    texts, targets = [r.text for r in recs], [r.keyphrases for r in recs]
    tables = {}
    for m in rep["methods"]:
        tables[m] = []
        for seed in (0, 1):
            preds = _preds(rep, m, seed, "text_hidden")
            want = score_cmkp(texts, targets, preds)
            cell = rep["results"]["text_hidden"][m]
            assert cell["F1@3"]["per_seed"][seed] == pytest.approx(want["F1@3"])
            assert cell["score"]["per_seed"][seed] == pytest.approx(
                want["F1@1"] + want["F1@3"] + want["MAP@5"]
            )
            tables[m].append(stats.post_table(texts, targets, preds))
        for k in stats.METRICS:
            c = rep["results"]["text_hidden"][m][k]
            ti = stats.t_interval(c["per_seed"])
            assert (c["mean"], c["lo"], c["hi"]) == pytest.approx((ti["mean"], ti["lo"], ti["hi"]))
    # the paired bootstrap, replicate by replicate from the saved predictions
    idx = stats.bootstrap_indices(6, 50, seed=0)
    diffs = []
    for b in range(50):
        sel = idx[b].tolist()

        def score(m: str, seed: int, sel=sel) -> float:
            p = _preds(rep, m, seed, "text_hidden")
            r = score_cmkp([texts[i] for i in sel], [targets[i] for i in sel], [p[i] for i in sel])
            return r["F1@1"] + r["F1@3"] + r["MAP@5"]

        diffs.append(
            np.mean([score("aimkp", s) for s in (0, 1)])
            - np.mean([score("sft", s) for s in (0, 1)])
        )
    c = rep["results"]["text_hidden"]["aimkp"]["score"]
    assert c["diff_lo"] == pytest.approx(np.percentile(diffs, 2.5))
    assert c["diff_hi"] == pytest.approx(np.percentile(diffs, 97.5))
    assert c["diff"] == pytest.approx(
        rep["results"]["text_hidden"]["aimkp"]["score"]["mean"]
        - rep["results"]["text_hidden"]["sft"]["score"]["mean"]
    )


def test_finished_runs_are_not_trained_again(compared, monkeypatch) -> None:
    out, argv, rep = compared
    import aimkp.train.loop

    def no_training(cfg):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(aimkp.train.loop, "train", no_training)
    more = [a if a != SETTINGS else SETTINGS + ",image_only" for a in argv]
    assert main(more) == 0  # a new setting: evaluation only
    rep2 = json.loads((out / "compare.json").read_text())
    assert rep2["settings"][-1] == "image_only"
    assert rep2["results"]["clean"] == rep["results"]["clean"]


def test_token_budget_gives_plain_fine_tuning_more_epochs(tmp_path) -> None:
    argv = [
        "compare",
        *TINY,
        "--methods",
        "sft,aimkp",
        "--seeds",
        "1",
        "--epochs",
        "2",
        "--budget",
        "tokens",
        "--settings",
        "clean",
        "--bootstrap",
        "10",
        "--output",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rep = json.loads((tmp_path / "compare.json").read_text())
    aim, sft = rep["runs"]["aimkp"]["0"], rep["runs"]["sft"]["0"]
    res = json.loads((tmp_path / "runs/aimkp/e2-s0/result.json").read_text())
    per_epoch = res["first_epoch_tokens"]
    assert aim["epochs"] == 2 and aim["trained_tokens"] > 2 * per_epoch  # copies cost tokens
    assert sft["epochs"] == max(2, round(aim["trained_tokens"] / per_epoch))
    assert sft["trained_tokens"] == sft["epochs"] * per_epoch


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "sft,dpo"], "unknown method 'dpo'"),
        (["--methods", "sft,aimkp:gf_reduce=max"], "gf_reduce must be one of"),
        (["--methods", "sft,aimkp:bogus=1"], "unknown TrainConfig field 'bogus'"),
        (["--settings", "clean,blurry"], "unknown setting 'blurry'"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--methods", "sft", "--budget", "tokens"], "needs at least one aimkp method"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, extra, message) -> None:
    argv = ["compare", *TINY, "--output", str(tmp_path / "x"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aimkp compare: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "x" / "runs").exists()  # nothing trained


def test_a_stopped_run_continues_from_its_last_checkpoint(tmp_path, monkeypatch) -> None:
    """A run stopped after its first epoch (as a killed comparison leaves it: ``last`` written,
    no result.json) is resumed from ``last`` by the next ``aimkp compare``, not retrained."""
    import dataclasses

    import aimkp.train.loop
    from aimkp.cli import build_parser
    from aimkp.cli.compare import build_spec
    from aimkp.compare.methods import parse_methods
    from aimkp.compare.run import run_config

    argv = [
        "compare", *TINY, "--methods", "sft", "--seeds", "1", "--epochs", "2",
        "--settings", "clean", "--bootstrap", "10", "--output", str(tmp_path),
    ]  # fmt: skip
    spec = build_spec(build_parser(argv)[0].parse_args(argv), argv)
    cfg = run_config(spec, parse_methods("sft")[0], 0, 2)
    assert cfg.save_every == 20  # the comparison's step checkpoints
    real_train = aimkp.train.loop.train
    real_train(dataclasses.replace(cfg, stop_after_epochs=1))  # the "killed" run
    assert not (tmp_path / "runs/sft/e2-s0/result.json").exists()
    seen: list[str | None] = []

    def spy(c):
        seen.append(c.resume)
        return real_train(c)

    monkeypatch.setattr(aimkp.train.loop, "train", spy)
    assert main(argv) == 0
    assert seen == [cfg.output]
    res = json.loads((tmp_path / "runs/sft/e2-s0/result.json").read_text())
    assert res["resumed"] is True and [h["epoch"] for h in res["history"]] == [1, 2]
    assert res["config"] == cfg.to_dict()  # the result records the run's config, not the resume

    def no_training(c):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(aimkp.train.loop, "train", no_training)
    assert main([*argv, "--save-every", "5"]) == 0  # how often it saved does not define a run
