"""The 7B shapes of aimkp.models.shapes: their configs are the published ones, and each builds and
trains (one AimKP step through the real adapter) at a size the CPU holds, through the same code."""

from __future__ import annotations

import math

import pytest
import torch

from aimkp.errors import UsageError
from aimkp.method.options import StepOptions
from aimkp.method.pmm import StrideTable
from aimkp.method.step import aimkp_step
from aimkp.models.lora import apply_lora
from aimkp.models.presets import qwen_tokenizer, qwen_vl_config
from aimkp.models.shapes import SHAPES, build_shaped, qwen2vl7b_text, qwen2vl7b_vision
from tests.helpers.models import (
    KEYPHRASES,
    TEXTS,
    records,
)
from tests.helpers.shapes import SMALL

WORDS = TEXTS + [k for ks in KEYPHRASES for k in ks]

# Qwen2-VL-7B-Instruct's config.json (the fields that set the cost of a step)
QWEN2VL_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rms_norm_eps": 1e-6,
}
QWEN2VL_7B_VISION = {
    "embed_dim": 1280,
    "hidden_size": 3584,
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}

IMAGE_PX = {"llava7b": 84, "qwen2vl7b": 112}
IMAGE_TOKENS = {"llava7b": (84 // 14) ** 2, "qwen2vl7b": (112 // 28) ** 2}


def test_qwen2vl7b_config_is_the_published_one():
    cfg = qwen_vl_config(qwen_tokenizer(WORDS), qwen2vl7b_text(28), qwen2vl7b_vision(32))
    text, vision = cfg.text_config, cfg.vision_config
    for k, v in QWEN2VL_7B_TEXT.items():
        assert getattr(text, k) == v, k
    for k, v in QWEN2VL_7B_VISION.items():
        assert getattr(vision, k) == v, k
    assert text.num_hidden_layers == 28 and vision.depth == 32
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert text.rope_parameters["rope_theta"] == 1e6
    assert text.hidden_size // text.num_attention_heads == 128  # head_dim
    assert not cfg.tie_word_embeddings
    assert (SHAPES["qwen2vl7b"].layers, SHAPES["qwen2vl7b"].vision_layers) == (28, 32)
    # 672 px: 48 x 48 patches, merged 2 x 2 -> 576 image tokens (as LLaVA-1.5's 336 / 14)
    px = SHAPES["qwen2vl7b"].image_px
    assert (px // 14 // 2) ** 2 == (SHAPES["llava7b"].image_px // 14) ** 2 == 576


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_builds_and_trains_one_aimkp_step(name):
    recs = [records()[0], records()[3]]  # with images, one square and one wide
    loaded = build_shaped(
        name, layers=1, vision_layers=1, texts=WORDS, overrides=SMALL[name], image_px=IMAGE_PX[name]
    )
    assert loaded.info["shape"] == name
    text_cfg = loaded.adapter.language_model.config
    assert text_cfg.vocab_size >= len(loaded.tokenizer)  # never smaller than the tokenizer
    assert text_cfg.num_hidden_layers == 1
    apply_lora(loaded, r=4, alpha=8, dropout=0.0)
    loaded.model.train()
    samples = [loaded.adapter.encode(r) for r in recs]
    square, wide = samples
    assert square.image_span[1] - square.image_span[0] == IMAGE_TOKENS[name]
    assert wide.image_span[1] - wide.image_span[0] == math.prod(wide.grid)
    table = StrideTable(2)
    table.text[:] = 2
    table.image[:] = 2
    n = float(sum(s.n_answer_tokens for s in samples))
    res = aimkp_step(loaded, samples, [0, 1], table, n, StepOptions(update_strides=False))
    assert res.n_rows == 6 and math.isfinite(res.loss)
    grads = [p.grad for p in loaded.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_unknown_shape_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown model shape 'gpt7b'"):
        build_shaped("gpt7b", layers=1, vision_layers=1, texts=WORDS)
