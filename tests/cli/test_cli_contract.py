"""The CLI contract over bad inputs, one table: every case ends in one line on stderr
(``aimkp CMD: error: ...`` containing the expected fragment), exit status 2, no traceback, and
nothing of the user's changed (the directory tree, sizes, modes and mtimes are the same before
and after, and nothing new appears).

A new case is one :class:`Case` in :data:`CASES`: the argv (``{tmp}`` is the case's own
directory, also the working directory), a set-up function that lays out the files it needs there,
and the fragment the error line must contain. The cases run in-process (no model is loaded
before the error in any of them), so each takes milliseconds.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import save_file

from aimkp.cli import main

Setup = Callable[[pathlib.Path], None]


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    expect: str
    setup: Setup = field(default=lambda tmp: None)
    # the environment of the case (a package made missing, ...), given pytest's monkeypatch
    patch: Callable[[pytest.MonkeyPatch], None] = field(default=lambda mp: None)


def without(package: str) -> Callable[[pytest.MonkeyPatch], None]:
    """The case runs as if ``package`` were not installed."""
    return lambda mp: mp.setitem(sys.modules, package, None)


def snapshot(root: pathlib.Path) -> dict[str, tuple[bool, int, int, int]]:
    """Every path under ``root``: (is a directory, size, mode, mtime in ns)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = pathlib.Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mode, st.st_mtime_ns)
    return out


# --- set-ups -------------------------------------------------------------------------------


def _write(p: pathlib.Path, text: str | bytes = "x") -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)


def a_finished_run(tmp: pathlib.Path, name: str = "run") -> None:
    """What ``aimkp train`` leaves: config.json, metrics.csv, best/, last/ (train_state.pt)."""
    run = tmp / name
    _write(run / "config.json", json.dumps({"model": "tiny-llava", "data": "synthetic:0"}))
    _write(run / "metrics.csv", "epoch,loss\n1,0.5\n")
    _write(run / "best" / "adapter_config.json", json.dumps({"base_model_name_or_path": "b"}))
    _write(run / "best" / "adapter_model.safetensors", b"\0" * 16)
    _write(run / "last" / "train_state.pt", b"\0" * 16)
    _write(run / "base" / "config.json", json.dumps({"model_type": "llava"}))
    _write(run / "base" / "model.safetensors", b"\0" * 16)


def an_adapter(tmp: pathlib.Path, name: str = "ck", r: int = 4, weights_r: int = 4) -> None:
    """A LoRA adapter checkpoint (peft format) of rank ``r`` holding weights of ``weights_r``."""
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"base_model_name_or_path": str(tmp / "base"), "r": r, "lora_alpha": 8}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    key = "base_model.model.layers.0.q_proj.lora_{}.weight"
    tensors = {
        key.format("A"): torch.zeros(weights_r, 16),
        key.format("B"): torch.zeros(16, weights_r),
    }
    save_file(tensors, str(d / "adapter_model.safetensors"))


def a_truncated_adapter(tmp: pathlib.Path) -> None:
    an_adapter(tmp)
    w = tmp / "ck" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size - 100])


def an_adapter_with_bad_json(tmp: pathlib.Path) -> None:
    an_adapter(tmp)
    (tmp / "ck" / "adapter_config.json").write_text('{"r": 4,\n "lora_alpha": }')


def an_adapter_of_another_rank(tmp: pathlib.Path) -> None:
    an_adapter(tmp, r=4, weights_r=8)


def a_run_with_a_truncated_last(tmp: pathlib.Path) -> None:
    a_finished_run(tmp)
    an_adapter(tmp, "run/last")  # beside train_state.pt
    w = tmp / "run" / "last" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-8])


def user_files(tmp: pathlib.Path, name: str = "mine") -> None:
    _write(tmp / name / "thesis.tex", "my work")
    _write(tmp / name / "notes" / "a.txt", "notes")


def cwd_with_files(tmp: pathlib.Path) -> None:
    _write(tmp / "thesis.tex", "my work")


def jsonl(tmp: pathlib.Path, name: str, rows: list[dict], prefix: bytes = b"") -> None:
    _write(tmp / name, prefix + "".join(json.dumps(r) + "\n" for r in rows).encode())


def posts(tmp: pathlib.Path) -> None:
    jsonl(tmp, "posts.jsonl", [{"id": "a", "text": "t", "keyphrases": ["k"]}])


def yaml_with_a_duplicate_key(tmp: pathlib.Path) -> None:
    _write(tmp / "c.yaml", "lr: 1e-3\nepochs: 2\nlr: 2e-3\n")


def posts_with(tmp: pathlib.Path, *rows: dict) -> None:
    jsonl(
        tmp,
        "posts.jsonl",
        [{"id": str(i), "text": "t", "keyphrases": ["k"]} | r for i, r in enumerate(rows)],
    )


TRAIN = ["train", "--preset", "tiny-llava", "--data", "synthetic:0"]
NO_CUDA = not torch.cuda.is_available()

CASES = [
    # 1. the output-directory policy: nothing of the user's is overwritten
    Case(
        "train-into-a-finished-run",
        [*TRAIN, "--output", "{tmp}/run"],
        "holds a training run already",
        a_finished_run,
    ),
    Case(
        "train-into-user-files",
        [*TRAIN, "--output", "{tmp}/mine"],
        "is not empty and holds no aimkp run",
        user_files,
    ),
    Case("train-into-cwd", [*TRAIN, "--output", "."], "is not empty", cwd_with_files),
    Case("train-into-root", [*TRAIN, "--output", "/"], "is the root of the file system"),
    Case(
        "train-resume-into-another-run",
        [*TRAIN, "--resume", "{tmp}/run", "--output", "{tmp}/other"],
        "while a different run is resumed",
        lambda t: (a_finished_run(t), a_finished_run(t, "other")),
    ),
    Case(
        "export-into-the-runs-base",
        ["export", "--checkpoint", "{tmp}/run/best", "--output", "{tmp}/run/base"],
        "is inside the checkpoint",
        a_finished_run,
    ),
    Case(
        "export-into-the-checkpoint",
        ["export", "--checkpoint", "{tmp}/run/best", "--output", "{tmp}/run/best/merged"],
        "is inside the checkpoint",
        a_finished_run,
    ),
    Case(
        "export-into-user-files",
        ["export", "--checkpoint", "{tmp}/run/best", "--output", "{tmp}/mine"],
        "is not empty",
        lambda t: (a_finished_run(t), user_files(t)),
    ),
    Case(
        "evaluate-report-into-a-checkpoint",
        ["evaluate", "--checkpoint", "tiny-llava", "--output", "{tmp}/run/last"],
        "is inside the checkpoint",
        a_finished_run,
    ),
    Case(
        "convert-into-its-own-input",
        ["data", "convert", "--data", "{tmp}/posts.jsonl", "--out", "{tmp}/posts.jsonl"],
        "is the input",
        lambda t: posts_with(t, {}),
    ),
    Case(
        "convert-to-hf-into-user-files",
        ["data", "convert", "--data", "{tmp}/posts.jsonl", "--to", "hf", "--out", "{tmp}/mine"],
        "is not empty; the DatasetDict is written whole",
        lambda t: (posts_with(t, {}), user_files(t)),
    ),
    # 3. a missing optional dependency, named before any work
    Case(
        "evaluate-without-matplotlib",
        ["evaluate", "--checkpoint", "tiny-llava", "--data", "synthetic:0", "--output", "{tmp}/r"],
        "robustness.png needs the matplotlib package",
        patch=without("matplotlib"),
    ),
    Case(
        "compare-without-matplotlib",
        ["compare", "--quick", "--seeds", "1", "--output", "{tmp}/cmp"],
        "compare.png needs the matplotlib package",
        patch=without("matplotlib"),
    ),
    Case(
        "train-report-to-a-missing-wandb",
        [*TRAIN, "--report-to", "wandb", "--output", "{tmp}/run"],
        "--report-to wandb needs the wandb package",
        patch=without("wandb"),
    ),
    # 4. checkpoint files that cannot be loaded whole, named before any work
    *[
        Case(f"{cmd}-{fault}", [*argv, "--checkpoint", "{tmp}/ck"], msg, setup)
        for cmd, argv in [
            ("predict", ["predict", "--data", "synthetic:0", "--out", "{tmp}/p.txt"]),
            ("evaluate", ["evaluate", "--data", "synthetic:0", "--output", "{tmp}/report"]),
            ("export", ["export", "--output", "{tmp}/merged"]),
        ]
        for fault, msg, setup in [
            ("truncated", "adapter_model.safetensors: truncated", a_truncated_adapter),
            ("bad-json", "adapter_config.json: line 2: not valid JSON", an_adapter_with_bad_json),
            ("other-rank", "LoRA weights of rank 8", an_adapter_of_another_rank),
        ]
    ],
    Case(
        "resume-with-a-truncated-last",
        ["train", "--resume", "{tmp}/run"],
        "adapter_model.safetensors: truncated",
        a_run_with_a_truncated_last,
    ),
    # 7. options that would silently do something else
    *(
        [Case("bf16-on-the-cpu", [*TRAIN, "--bf16", "--output", "{tmp}/run"], "drop --bf16")]
        if NO_CUDA
        else []
    ),
    Case(
        "correction-with-lora-dropout",
        [*TRAIN, "--reweight", "correction", "--lora-dropout", "0.1", "--output", "{tmp}/run"],
        "pass --lora-dropout 0 or --reweight stash",
    ),
    # 8. config and data details
    Case(
        "yaml-duplicate-key",
        [*TRAIN, "--config", "{tmp}/c.yaml", "--output", "{tmp}/run"],
        "line 3: key 'lr' given twice (first at line 1)",
        yaml_with_a_duplicate_key,
    ),
    Case(
        "duplicate-post-ids",
        ["data", "info", "--data", "{tmp}/posts.jsonl"],
        "posts.jsonl:2: duplicate post id 'a' (first at",
        lambda t: posts_with(t, {"id": "a"}, {"id": "a"}),
    ),
    Case(
        "semicolon-inside-a-keyphrase",
        ["data", "info", "--data", "{tmp}/posts.jsonl"],
        "posts.jsonl:1: keyphrase 'a;b' in 'keyphrases' contains ';'",
        lambda t: posts_with(t, {"keyphrases": ["a;b"]}),
    ),
    Case(
        "image-path-is-a-directory",
        ["data", "info", "--data", "{tmp}/posts.jsonl"],
        "posts.jsonl:1: image path is a directory",
        lambda t: (posts_with(t, {"image": "pics"}), (t / "pics").mkdir()),
    ),
    # 6. late or misleading errors
    Case(
        "train-on-a-post-longer-than-the-context",
        [
            *TRAIN[:3],
            "--data",
            "{tmp}/posts.jsonl",
            "--valid-data",
            "{tmp}/posts.jsonl",
            "--output",
            "{tmp}/run",
            "--lora-r",
            "4",
        ],
        "posts.jsonl:2: the post is",
        lambda t: posts_with(t, {}, {"text": "word " * 3000}),
    ),  # fmt: skip
    Case(
        "predict-on-a-missing-checkpoint-dir",
        ["predict", "--checkpoint", "runs/best", "--data", "synthetic:0", "--out", "p.txt"],
        "runs/best: no such checkpoint directory",
        lambda t: (t / "runs").mkdir(),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, monkeypatch, capsys):
    root = tmp_path / "case"
    root.mkdir()
    case.setup(root)
    case.patch(monkeypatch)
    monkeypatch.chdir(root)
    before = snapshot(root)
    argv = [a.replace("{tmp}", str(root)) for a in case.argv]
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln]
    assert "Traceback" not in err
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"aimkp {argv[0]}: error: "), err
    assert case.expect in lines[0], lines[0]
    assert snapshot(root) == before, "the command changed the user's files"
