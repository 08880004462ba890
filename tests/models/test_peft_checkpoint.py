"""LoRA checkpoints in peft's format: plain peft, ``aimkp export``'s merged model, ``load_model``
and ``aimkp predict`` all give the in-memory trained model's logits; full fine-tuning still saves
full weights; resume state written before the projector became ``modules_to_save`` still loads;
hub ids resolve from a (fake) local cache only."""

from __future__ import annotations

import json

import pytest
import torch

from aimkp.cli import main
from aimkp.eval.predict import Predictor
from aimkp.models import load_model, save_checkpoint
from aimkp.models.lora import apply_lora
from aimkp.runs.state import frozen_checksum, load_trainable_state, trainable_state
from tests.helpers.models import (
    records,
    tiny,
)

FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "config.json")


def _trained_llava():
    """tiny-llava with LoRA (random B) and a projector copy moved away from the original."""
    loaded = tiny("tiny-llava")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in loaded.model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    loaded.model.eval()
    return loaded


def _logits(model, loaded) -> list[torch.Tensor]:
    """Logits [1, T, V] of the multimodal and text-only records (the loaded model's encoding)."""
    out = []
    with torch.no_grad():
        for rec in records()[:2]:
            s = loaded.adapter.encode(rec)
            kw = loaded.adapter.generation_kwargs([s], s.input_ids[None])
            out.append(model(input_ids=s.input_ids[None], **kw).logits)
    return out


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(trained LoadedModel, its logits, run dir) with best/ saved as the training loop does."""
    loaded = _trained_llava()
    run = tmp_path_factory.mktemp("run")
    (run / "best").mkdir()
    (run / "best" / "model.safetensors").write_text("stale")  # an older save's full weights
    (run / "best" / "aimkp.json").write_text("{}")
    save_checkpoint(run / "best", loaded, extra_json={"epoch": 1}, base_dir=run / "base")
    return loaded, _logits(loaded.model, loaded), run


def test_adapter_dir_is_peft_format_without_full_weights(saved):
    loaded, _, run = saved
    best = run / "best"
    assert (best / "adapter_config.json").is_file() and (
        best / "adapter_model.safetensors"
    ).is_file()
    assert not any((best / f).exists() for f in FULL_WEIGHTS)
    cfg = json.loads((best / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((run / "base").resolve())
    assert cfg["modules_to_save"] == ["model.multi_modal_projector"]
    meta = json.loads((best / "aimkp.json").read_text())
    assert meta["weights"] == "peft" and meta["preset"] == "tiny-llava"
    assert (run / "base" / "model.safetensors").is_file()  # the preset's base, saved once


def test_plain_peft_round_trip_and_base_is_untrained(saved):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    loaded, want, run = saved
    ref = json.loads((run / "best" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForImageTextToText.from_pretrained(ref)
    base_logits = _logits(base, loaded)
    assert not torch.allclose(base_logits[0], want[0], atol=1e-3)  # the base is the initial one
    model = PeftModel.from_pretrained(base, str(run / "best")).eval()
    _assert_same(_logits(model, loaded), want)


def test_export_merged_and_load_model_match_in_memory(saved, tmp_path):
    from transformers import AutoModelForImageTextToText

    loaded, want, run = saved
    out = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(run / "best"), "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    _assert_same(_logits(merged, loaded), want)
    for d in (run / "best", out):  # the adapter and its merged export load alike
        back = load_model(d)
        assert back.preset == "tiny-llava"
        _assert_same(_logits(back.model.eval(), back), want)
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--output", str(out)]) == 2


def test_predict_reads_adapter_checkpoint_after_run_dir_moved(saved, tmp_path, capsys):
    loaded, _, run = saved
    moved = tmp_path / "moved"
    moved.mkdir()
    for sub in ("best", "base"):
        (run / sub).rename(moved / sub)
    try:
        recs = records()
        want = Predictor(loaded, max_new_tokens=4).predict(recs)
        back = load_model(moved / "best")  # the absolute base path is gone: found beside it
        assert Predictor(back, max_new_tokens=4).predict(recs) == want
        out = tmp_path / "pred.txt"
        argv = ["predict", "--checkpoint", str(moved / "best"), "--data", "default", "--out",
                str(out), "--limit", "2", "--max-new-tokens", "4", "--device", "cpu"]  # fmt: skip
        assert main(argv) == 0
        assert len(out.read_text().splitlines()) == 2
        (moved / "base" / "config.json").unlink()
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1 and err[0].startswith("aimkp predict: error: ") and "base model" in err[0]
        )
    finally:
        for sub in ("best", "base"):
            (moved / sub).rename(run / sub)


def test_merged_checkpoint_of_older_versions_loads(saved, tmp_path):
    """Format 1 saved LoRA runs merged (full weights, aimkp.json without "weights")."""
    from aimkp.models.checkpoint import merged_state_dict, save_full_weights, save_processors

    loaded, want, _ = saved
    old = tmp_path / "old"
    old.mkdir()
    save_full_weights(old, loaded.model, merged_state_dict(loaded.model))
    save_processors(old, loaded)
    meta = {"format": 1, "model_type": "llava", "preset": "tiny-llava", "lora": {"r": 8}}
    (old / "aimkp.json").write_text(json.dumps(meta))
    back = load_model(old)
    assert back.preset == "tiny-llava"
    _assert_same(_logits(back.model.eval(), back), want)


def test_full_finetune_saves_full_weights(tmp_path):
    loaded = tiny("tiny-llava", lora=False)
    apply_lora(loaded, full=True)
    with torch.no_grad():
        loaded.adapter.lm_head.weight.mul_(1.5)
    save_checkpoint(tmp_path / "ckpt", loaded)
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert not (tmp_path / "ckpt" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "ckpt" / "aimkp.json").read_text())["weights"] == "full"
    back = load_model(tmp_path / "ckpt")
    torch.testing.assert_close(back.adapter.lm_head.weight, loaded.adapter.lm_head.weight)
    apply_lora(back, r=4, alpha=8)  # LoRA on top of it: the directory is now the base
    with pytest.raises(ValueError, match="own base model"):
        save_checkpoint(tmp_path / "ckpt", back)
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()  # the base was not touched


def test_resume_state_from_before_modules_to_save_loads():
    """A train_state.pt of older runs named the projector without ``modules_to_save.default``
    and had it trainable in place: its trainable state and frozen checksum still match."""
    old = tiny("tiny-llava", lora=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        apply_lora(old, r=8, alpha=16, dropout=0.0, train_projector=False)
    for p in old.adapter.projector.parameters():
        p.requires_grad_(True)  # how the projector used to be trained
    new = tiny("tiny-llava")
    assert frozen_checksum(old.model) == frozen_checksum(new.model)
    state = trainable_state(old.model)
    assert any("multi_modal_projector.linear_1" in n for n in state)
    with torch.no_grad():
        for v in state.values():
            v.add_(1.0)
    load_trainable_state(new.model, state)
    got = [p for p in new.model.parameters() if p.requires_grad]
    assert len(got) == len(state)
    for g, w in zip(got, state.values()):
        assert torch.equal(g, w)


def _fake_cache(root, hub_id: str, loaded) -> None:
    """The hub cache layout: models--org--name/{refs/main, snapshots/<hash>/...}."""
    repo = root / ("models--" + hub_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    loaded.model.save_pretrained(snap)
    loaded.tokenizer.save_pretrained(snap)
    loaded.image_processor.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")


def test_hub_id_from_local_cache_only(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_cache(cache, "org/tiny-llava", tiny("tiny-llava", lora=False))
    loaded = load_model("org/tiny-llava")
    assert loaded.info["hub_id"] == "org/tiny-llava"
    assert "snapshots/0123abcd" in loaded.info["source"]
    apply_lora(loaded, r=4, alpha=8)
    save_checkpoint(tmp_path / "ckpt", loaded)
    cfg = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny-llava"
    assert not (tmp_path / "ckpt" / "base").exists()  # a cached base is named, not copied
    assert load_model(tmp_path / "ckpt").info["base"] == loaded.info["source"]
    with pytest.raises(ValueError) as exc:
        load_model("org/not-cached")
    msg = str(exc.value)
    assert "org/not-cached" in msg and str(cache) in msg and "\n" not in msg
