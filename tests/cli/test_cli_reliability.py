"""Reliability of the commands end to end: a full disk named in one line (a real small tmpfs
where it can be mounted), checkpoint files that other users can read (the umask respected), a
missing plot library named before any decoding or training."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from aimkp.atomic import atomic_dir, is_no_space
from aimkp.cli import main
from aimkp.errors import UsageError

TINY = ["--preset", "tiny-llava", "--data", "synthetic:0", "--quick", "--max-train-samples", "8",
        "--eval-max-samples", "4", "--threads", "1"]  # fmt: skip


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [ln for ln in err.splitlines() if ln.startswith("aimkp")]


@contextlib.contextmanager
def small_tmpfs(where: pathlib.Path, size: str):
    """A tmpfs of ``size`` mounted at ``where`` (skips when mounting is not allowed here)."""
    where.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="mounts a tmpfs (root)")
def test_a_full_disk_is_one_line_naming_the_path_and_the_space(tmp_path, capsys, monkeypatch):
    """9 MiB: the pre-check refuses the run (the peak of its checkpoints is ~19 MiB); with the
    pre-check out of the way the second epoch's last/ fills a 14 MiB disk: one line naming the
    path, the free space and the space needed, exit 2, the first epoch's last/ intact."""
    from aimkp.runs.state import read_train_state

    with small_tmpfs(tmp_path / "small", "9m") as disk:
        code = main(["train", *TINY, "--epochs", "2", "--output", str(disk / "run")])
        err = _error_lines(capsys)
        assert code == 2 and len(err) == 1, err
        assert "not enough free space for the run's checkpoints" in err[0]
        assert "MiB needed" in err[0] and "MiB free" in err[0]
        assert not [p for p in (disk / "run").rglob("*") if p.suffix == ".safetensors"]

    # 14 MiB hold the first epoch's best/ and last/ (~12 MiB), not the second last/ beside them
    monkeypatch.setattr("aimkp.train.loop.check_free_space", lambda run: None)
    with small_tmpfs(tmp_path / "disk", "14m") as disk:
        code = main(["train", *TINY, "--epochs", "2", "--output", str(disk / "run")])
        err = _error_lines(capsys)
        assert code == 2 and len(err) == 1, err
        assert f"no space left on device writing {disk / 'run' / 'last'}" in err[0]
        assert "MiB free" in err[0] and "MiB needed" in err[0] and "previous last is kept" in err[0]
        assert read_train_state(disk / "run")["epoch"] == 1  # the previous last/ survived
        assert not [p for p in (disk / "run").iterdir() if p.name.startswith(".last.tmp")]


def test_torchs_zip_writer_failure_is_a_full_disk() -> None:
    """What torch.save raised on the full tmpfs (no 'write' in it)."""
    exc = RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 4642752 vs 4642640"
    )
    assert is_no_space(exc)
    assert not is_no_space(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_files_follow_the_umask(tmp_path, umask) -> None:
    """safetensors creates its files 0600; a checkpoint's files get what open() would give."""
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "best") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "best" / name).stat().st_mode & 0o777 == 0o666 & ~umask


def _no_matplotlib(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then finds nothing


def test_evaluate_without_matplotlib_says_so_before_decoding(tmp_path, capsys, monkeypatch):
    import aimkp.models

    _no_matplotlib(monkeypatch)
    monkeypatch.setattr(aimkp.models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    out = tmp_path / "report"
    code = main(["evaluate", "--checkpoint", "tiny-llava", "--data", "synthetic:0", "--output",
                 str(out)])  # fmt: skip
    err = _error_lines(capsys)
    assert code == 2 and len(err) == 1
    assert "robustness.png needs the matplotlib package" in err[0] and "--no-plot" in err[0]
    assert not out.exists()


def test_compare_without_matplotlib_says_so_before_training(tmp_path, capsys, monkeypatch):
    import aimkp.compare.run

    _no_matplotlib(monkeypatch)
    monkeypatch.setattr(aimkp.compare.run, "run_all", lambda spec: pytest.fail("trained"))
    code = main(["compare", "--quick", "--seeds", "1", "--output", str(tmp_path / "cmp")])
    err = _error_lines(capsys)
    assert code == 2 and len(err) == 1 and "compare.png needs the matplotlib package" in err[0]


def test_the_robustness_report_is_written_before_its_plot(tmp_path, monkeypatch):
    """A library caller without matplotlib: refused before decoding; with plot=False the report
    is whole."""
    from aimkp.data import load_dataset
    from aimkp.errors import UsageError
    from aimkp.eval.robustness import run_robustness

    _no_matplotlib(monkeypatch)
    records = list(load_dataset("synthetic:0", "test"))[:3]
    calls = []

    def predict(recs):
        calls.append(1)
        return [["k"] for _ in recs]

    with pytest.raises(UsageError, match="needs the matplotlib package"):
        run_robustness(predict, records, settings="clean", out_dir=tmp_path, plot=True)
    assert calls == []
    res = run_robustness(predict, records, settings="clean", out_dir=tmp_path, plot=False)
    assert pathlib.Path(res["files"]["json"]).is_file()


def test_bench_finds_the_checkout_in_the_working_directory(tmp_path, monkeypatch) -> None:
    """aimkp installed without -e (its package away from the checkout): the working
    directory's benchmarks/ is used, as ``python -m benchmarks`` there would."""
    import aimkp
    from aimkp.cli import bench
    from aimkp.errors import UsageError

    repo = pathlib.Path(__file__).resolve().parents[2]
    monkeypatch.delenv("AIMKP_BENCHMARKS", raising=False)
    monkeypatch.setattr(aimkp, "__file__", str(tmp_path / "site-packages" / "aimkp" / "x.py"))
    monkeypatch.chdir(repo)
    assert bench.benchmarks_dir() == repo / "benchmarks"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="nor in the working directory"):
        bench.benchmarks_dir()


def test_a_post_too_long_for_a_model_directory_is_named_before_it_loads(
    tmp_path, capsys, monkeypatch
) -> None:
    import json

    import aimkp.models
    from aimkp.models import load_model
    from aimkp.models.checkpoint import save_checkpoint

    model_dir = tmp_path / "model"
    save_checkpoint(model_dir, load_model("tiny-llava", train_texts=["a b c"]))
    rows = [{"id": str(i), "text": "word " * (4000 if i == 1 else 3), "keyphrases": ["k"]}
            for i in range(3)]  # fmt: skip
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(aimkp.models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    data = str(tmp_path / "p.jsonl")
    argv = ["train", "--model", str(model_dir), "--data", data, "--valid-data", data,
            "--output", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "p.jsonl:2: the post's text and keyphrases alone are" in err[0]
    assert "over the model's context of 1024" in err[0]
    assert not (tmp_path / "run").exists()


def test_the_final_line_names_only_the_checkpoints_written(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["train", *TINY, "--epochs", "1", "--no-eval", "--output", str(out)]
    assert main(argv) == 0
    done = [ln for ln in capsys.readouterr().out.splitlines() if "done:" in ln]
    assert done == [
        f"[aimkp train] done: 1 steps, no validation score (no best checkpoint); "
        f"checkpoints in {out / 'last'}"
    ]
    assert not (out / "best").exists()


def test_save_checkpoint_outside_a_run_follows_the_umask(tmp_path) -> None:
    """Library callers (no atomic_dir around it) get readable weights too."""
    from aimkp.models import load_model
    from aimkp.models.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ck", load_model("tiny-llava", train_texts=["a b"]))
    finally:
        os.umask(old)
    weights = list((tmp_path / "ck").glob("*.safetensors"))
    assert weights and all(w.stat().st_mode & 0o777 == 0o644 for w in weights)


def test_compare_names_a_variant_option_that_does_nothing(tmp_path, caplog, monkeypatch):
    import aimkp.compare.run

    def stop(spec):
        raise UsageError("stopped before training")

    monkeypatch.setattr(aimkp.compare.run, "run_all", stop)
    argv = ["compare", "--quick", "--seeds", "1", "--no-plot", "--methods",
            "aimkp,sft:tau_text=0.3", "--output", str(tmp_path / "cmp")]  # fmt: skip
    assert main(argv) == 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    want = "sft:tau_text=0.3: --tau-text 0.3 has no effect with --method sft (AimKP-only)"
    assert warned == [want]
