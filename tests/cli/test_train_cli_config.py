"""``aimkp train``'s flags generated from TrainConfig and ``--config run.yaml``: every field has a
flag, old flag names keep working, flags beat the file, the file beats ``--quick``, bad files are
one-line user errors."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import pytest

from aimkp.cli import main
from aimkp.cli import train as cli_train
from aimkp.cli.config_flags import add_config_flags, given_fields
from aimkp.train.config import TrainConfig


def _parse(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser()
    cli_train.add_arguments(p)
    return cli_train.config_from_args(p.parse_args(argv))


def _yaml(tmp: pathlib.Path, text: str) -> str:
    path = tmp / "run.yaml"
    path.write_text(text)
    return str(path)


def test_every_field_has_a_flag_with_its_help() -> None:
    p = argparse.ArgumentParser()
    cli_train.add_arguments(p)
    dests = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in dests, f.name
        assert dests[f.name].help and f.metadata["help"] in dests[f.name].help, f.name


def test_a_new_field_gets_its_flag_without_a_mapping() -> None:
    @dataclasses.dataclass
    class Cfg:
        save_every: int | None = dataclasses.field(default=None, metadata={"help": "every N"})
        skip_nonfinite: bool = dataclasses.field(default=True, metadata={"help": "skip"})
        note: str = "x"

    p = argparse.ArgumentParser()
    add_config_flags(p, Cfg, {})
    assert given_fields(p.parse_args([]), Cfg) == {}
    args = p.parse_args(["--save-every", "5", "--no-skip-nonfinite", "--note", "y"])
    assert given_fields(args, Cfg) == {"save_every": 5, "skip_nonfinite": False, "note": "y"}
    assert given_fields(p.parse_args(["--save-every", "none"]), Cfg) == {"save_every": None}


def test_old_flag_names_keep_working() -> None:
    c = _parse(["--preset", "tiny-qwen2vl", "--no-eval", "--threads", "3", "--max-grad-norm",
                "off", "--image-dir", "/imgs", "--on-bad-record", "skip"])  # fmt: skip
    assert (c.model, c.eval_every_epoch, c.num_threads, c.max_grad_norm) == (
        "tiny-qwen2vl", False, 3, None,
    )  # fmt: skip
    assert (c.image_dir, c.on_bad_record, c.on_missing_image) == ("/imgs", "skip", "error")
    assert _parse([]) == TrainConfig()  # nothing given: the dataclass defaults


def test_yaml_sets_fields_flags_win_and_quick_fills_the_rest(tmp_path: pathlib.Path) -> None:
    cfg = _yaml(tmp_path, "lr: 1.0e-3\nepochs: 2\ngrad_accum: 4\nmax_grad_norm: null\n"
                          "eval_every_epoch: false\ntau_text: 0\n")  # fmt: skip
    c = _parse(["--config", cfg, "--epochs", "3"])
    assert (c.lr, c.epochs, c.grad_accum, c.max_grad_norm) == (1e-3, 3, 4, None)
    assert c.eval_every_epoch is False and c.tau_text == 0.0 and isinstance(c.tau_text, float)
    q = TrainConfig.quick_overrides()
    c = _parse(["--quick", "--config", cfg])
    assert c.lr == 1e-3 and c.batch_size == q["batch_size"] and c.epochs == 2


@pytest.mark.parametrize(
    "text,msg",
    [
        ("lr: 1e-3\nbogus: 1\n", "unknown key(s) bogus"),
        ("epochs: two\n", "key 'epochs' must be int, got 'two'"),
        ("full_finetune: 1\n", "key 'full_finetune' must be bool"),
        ("max_grad_norm: [1]\n", "key 'max_grad_norm' must be float or null"),
        ("- lr\n", "expected a mapping"),
        ("lr: [\n", "not valid YAML at line"),
        ("epochs: 0\n", "epochs must be >= 1"),
    ],
)
def test_bad_config_files_are_one_line_errors(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture, text: str, msg: str
) -> None:
    run = tmp_path / "run"
    rc = main(["train", "--config", _yaml(tmp_path, text), "--output", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("aimkp train: error: "), err
    assert msg in err[0]
    assert not run.exists()


def test_missing_config_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--config", str(tmp_path / "no.yaml")]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_docs_yaml_example_is_a_valid_config(tmp_path: pathlib.Path) -> None:
    page = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    block = page.split("## Configuration files", 1)[1].split("```yaml\n", 1)[1]
    c = _parse(["--config", _yaml(tmp_path, block.split("```", 1)[0])])
    assert (c.grad_accum, c.max_grad_norm, c.eval_every_epoch) == (2, None, False)


def test_yaml_takes_what_the_user_means(tmp_path: pathlib.Path) -> None:
    """YAML 1.1 reads ``1e-3`` as a string; ``none`` is what the flag takes; a byte-order mark
    and hyphenated keys are accepted."""
    text = "\ufefflr: 1e-3\nmax_grad_norm: none\ngrad-accum: 2\ngrand_threshold: off\n"
    (tmp_path / "run.yaml").write_text(text, encoding="utf-8")
    cfg = _parse(["--config", str(tmp_path / "run.yaml")])
    assert cfg.lr == 1e-3 and cfg.max_grad_norm is None and cfg.grad_accum == 2
    assert cfg.grand_threshold is None
    with pytest.raises(ValueError, match="key 'lr' must be float"):
        _parse(["--config", _yaml(tmp_path, "lr: fast\n")])


def test_yaml_duplicate_keys_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="line 3: key 'epochs' given twice"):
        _parse(["--config", _yaml(tmp_path, "epochs: 2\nlr: 0.1\nepochs: 3\n")])


@pytest.mark.parametrize(
    "fields, given, warned",
    [
        ({"method": "sft", "tau_text": 0.3}, {"method", "tau_text"}, ["--tau-text 0.3"]),
        ({"method": "sft"}, {"method"}, []),  # defaults of AimKP options: nothing said
        ({"full_finetune": True, "lora_r": 8}, {"full_finetune", "lora_r"}, ["--lora-r 8"]),
        ({"freeze_embeddings": True}, {"freeze_embeddings"}, ["--freeze-embeddings True"]),
        ({"full_finetune": True, "lora_dropout": 0.0}, {"full_finetune"}, []),  # --quick's
    ],
)
def test_options_that_would_do_nothing_are_named(fields, given, warned) -> None:
    got = TrainConfig(**fields).check_consistency("cpu", given)
    assert [w.split(" has no effect")[0] for w in got] == warned


def test_options_that_cannot_be_honoured_are_refused() -> None:
    with pytest.raises(ValueError, match="drop --bf16"):
        TrainConfig(bf16=True).check_consistency("cpu")
    assert TrainConfig(bf16=True).check_consistency("cuda") == []
    with pytest.raises(ValueError, match="--reweight correction with --lora-dropout 0.05"):
        TrainConfig(reweight="correction").check_consistency("cuda")
    assert TrainConfig(reweight="correction", lora_dropout=0.0).check_consistency("cuda") == []
    assert TrainConfig(reweight="correction", method="sft").check_consistency("cuda", set()) == []


def test_train_warns_once_about_an_unused_option(tmp_path, caplog, monkeypatch, capsys) -> None:
    """Said once, before any work (the stand-in for the loop stops the run at once)."""
    import aimkp.train.loop
    from aimkp.errors import UsageError

    def stop(cfg):
        raise UsageError("stopped before training")

    monkeypatch.setattr(aimkp.train.loop, "train", stop)
    argv = ["train", "--method", "sft", "--tau-image", "0.2", "--output", str(tmp_path / "r")]
    assert main(argv) == 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["--tau-image 0.2 has no effect with --method sft (AimKP-only)"]
