"""Real 7B models' shapes with random weights and fewer layers, for benchmarks and memory plans.

No checkpoint can be fetched in the benchmarks' environment, and what a training step costs is set
by the shapes (hidden and MLP widths, heads, vocabulary, vision tower, image tokens), not by the
weights' values: each shape here is the published config of a real model, with the number of
decoder and vision layers left as arguments (per-layer costs are the same in every layer, so a
few layers measure them; ``benchmarks/memory_plan.py`` extrapolates to :attr:`Shape.layers`).

==============  ==============================================  ===========================
shape           language model                                  vision tower
==============  ==============================================  ===========================
llava7b         Llama (llava-1.5-7b-hf): hidden 4096, MLP        CLIP ViT-L/14-336: 1024 wide,
                11008, 32 heads (MHA), vocab 32,064, 32 layers  16 heads, 24 layers, 576
                                                                image tokens (GELU projector)
qwen2vl7b       Qwen2 (Qwen2-VL-7B-Instruct): hidden 3584,       Qwen2-VL ViT: 1280 wide, 16
                MLP 18944, 28 heads / 4 KV heads (GQA), vocab   heads, 32 layers, patch 14,
                152,064, mRoPE [16, 24, 24], 28 layers          2 x 2 merger to 3584
==============  ==============================================  ===========================

The Qwen2-VL shape's images are resized to about ``image_px`` ** 2 pixels, their aspect ratio
kept as Qwen2-VL's processor does (default 672: a square image is 48 x 48 patches, 576 image
tokens after the merge, as many as LLaVA-1.5's), the tokenizers are
trained on the given texts (the embedding table keeps the real vocabulary size, or the
tokenizer's where an override makes it smaller). ``overrides`` replaces config fields
(``{"text": {...}, "vision": {...}}``) so tests can build the same code path at a size a CPU
holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from aimkp.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclasses.dataclass(frozen=True)
class ShapeRequest:
    """What :func:`build_shaped` asks a shape's builder for."""

    layers: int  # decoder layers
    vision_layers: int
    texts: list[str]  # the tokenizer's training texts
    image_px: int
    overrides: dict[str, dict[str, Any]]  # {"text": {...}, "vision": {...}} config fields
    device: str


@dataclasses.dataclass(frozen=True)
class Shape:
    """One real model's shape: what it is, its full depth, and how to build it."""

    name: str
    title: str  # the real model it copies
    layers: int  # decoder layers of the real model
    vision_layers: int  # vision-tower layers of the real model
    image_px: int  # default image side
    build: Callable[[ShapeRequest], tuple[PreTrainedModel, Any, Any]]  # -> (model, tokenizer,
    # image processor)

    def describe(self, layers: int, vision_layers: int, image_tokens: int) -> str:
        """One line naming the shape and the sizes built."""
        return (
            f"{self.title}-shaped ({layers}/{self.layers} decoder layers, "
            f"{vision_layers}/{self.vision_layers} vision layers, {image_tokens} image tokens)"
        )


def _merge(base: dict[str, Any], over: dict[str, Any] | None) -> dict[str, Any]:
    return {**base, **(over or {})}


def _text_fields(base: dict[str, Any], over: dict[str, Any] | None, tok: Any) -> dict[str, Any]:
    """``base`` with ``over`` applied; the embedding table never smaller than the tokenizer."""
    text = _merge(base, over)
    text["vocab_size"] = max(int(text["vocab_size"]), len(tok))
    return text


def llava7b_text(layers: int) -> dict[str, Any]:
    """llava-1.5-7b-hf's Llama text config fields."""
    return dict(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )


def llava7b_vision(vision_layers: int, image_px: int) -> dict[str, Any]:
    """llava-1.5-7b-hf's CLIP ViT-L/14-336 config fields (``image_px`` = 336 in the real one)."""
    return dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=vision_layers,
        num_attention_heads=16,
        image_size=image_px,
        patch_size=14,
        projection_dim=768,
    )


def _build_llava7b(req: ShapeRequest) -> tuple[PreTrainedModel, Any, Any]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

    from aimkp.models.presets import llava_config, llava_processor, llava_tokenizer

    tok = llava_tokenizer(req.texts)
    vision = CLIPVisionConfig(
        **_merge(llava7b_vision(req.vision_layers, req.image_px), req.overrides.get("vision"))
    )
    text = LlamaConfig(
        **_text_fields(llava7b_text(req.layers), req.overrides.get("text"), tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    patch = vision.patch_size
    assert isinstance(patch, int)  # CLIP's patch side (14 here), not a per-axis pair
    cfg = llava_config(vision, text, tok, (req.image_px // patch) ** 2)
    with torch.device(req.device):
        model = LlavaForConditionalGeneration(cfg)
    return model, tok, llava_processor(req.image_px)


def qwen2vl7b_text(layers: int) -> dict[str, Any]:
    """Qwen2-VL-7B-Instruct's Qwen2 text config fields."""
    return {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": layers,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [16, 24, 24],
            "rope_theta": 1e6,
        },
    }


def qwen2vl7b_vision(vision_layers: int) -> dict[str, Any]:
    """Qwen2-VL-7B-Instruct's vision config fields (the merger projects to 3584)."""
    return {
        "depth": vision_layers,
        "embed_dim": 1280,
        "hidden_size": 3584,
        "num_heads": 16,
        "mlp_ratio": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }


def _build_qwen2vl7b(req: ShapeRequest) -> tuple[PreTrainedModel, Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from aimkp.models.presets import qwen_processor, qwen_tokenizer, qwen_vl_config

    tok = qwen_tokenizer(req.texts)
    vision = _merge(qwen2vl7b_vision(req.vision_layers), req.overrides.get("vision"))
    text = _text_fields(qwen2vl7b_text(req.layers), req.overrides.get("text"), tok)
    cfg = qwen_vl_config(tok, text, vision)
    assert isinstance(cfg, Qwen2VLConfig)  # version "2", the default
    with torch.device(req.device):
        model = Qwen2VLForConditionalGeneration(cfg)
    return model, tok, qwen_processor(req.image_px, vision["patch_size"])


SHAPES: dict[str, Shape] = {
    "llava7b": Shape("llava7b", "LLaVA-1.5-7B", 32, 24, 336, _build_llava7b),
    "qwen2vl7b": Shape("qwen2vl7b", "Qwen2-VL-7B", 28, 32, 672, _build_qwen2vl7b),
}


def build_shaped(
    name: str,
    *,
    layers: int,
    vision_layers: int,
    texts: list[str],
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    image_px: int | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """A :class:`aimkp.models.LoadedModel` of shape ``name`` (:data:`SHAPES`) with random
    weights (nothing downloaded), ``layers`` decoder and ``vision_layers`` vision layers, its
    parameters in ``dtype`` on ``device``, sdpa attention; ``info["shape"]`` names it."""
    from aimkp.models import LoadedModel, get_adapter

    if name not in SHAPES:
        raise UsageError(f"unknown model shape {name!r}; known: {sorted(SHAPES)}")
    shape = SHAPES[name]
    px = image_px or shape.image_px
    req = ShapeRequest(layers, vision_layers, texts, px, overrides or {}, device)
    model, tok, proc = shape.build(req)
    model.to(dtype)  # type: ignore[arg-type]  # transformers wraps .to; its stub loses the signature
    model.set_attn_implementation("sdpa")
    adapter = get_adapter(model, tok, proc)
    info = {"attn": "sdpa", "shape": name, "image_px": px}
    return LoadedModel(model, tok, proc, adapter, preset=None, info=info)
