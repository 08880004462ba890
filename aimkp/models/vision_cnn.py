"""A CNN vision tower that a ``LlavaForConditionalGeneration`` takes in place of CLIP.

``CNNVisionModel`` is a ``transformers`` model (config ``model_type="aimkp_cnn_vision"``, registered
with ``AutoConfig`` / ``AutoModel`` when this module is imported), so ``LlavaConfig(vision_config=
CNNVisionConfig(...))`` builds it through LLaVA's own ``AutoModel.from_config`` and
``save_pretrained`` / ``from_pretrained`` round-trip it like any other tower. Two encoders:

- ``"efficientnet-lite0"``: EfficientNet-Lite0 (``efficientnet_lite_pytorch``), 224 px -> its last
  conv map ``[1280, 7, 7]`` (``extract_features``), i.e. 49 image tokens of width 1280; the
  ``smol-llava`` preset loads its ImageNet weights.
- ``"tiny"``: the same shape of network at toy size (stride-2 conv + BN + ReLU6 stages down to
  ``image_size / patch_size`` per side), random weights: tests build the architecture with it.

The output mimics a ViT so that LLaVA's ``default`` feature selection (drop the first token)
applies unchanged: ``hidden_states[-1] = [N, 1 + h * w, C]`` whose token 0 is the average-pooled
map (a stand-in for CLS, dropped by LLaVA) and the rest the map's cells in row-major order.

The tower is frozen in aimkp (only the projector and LoRA train), so :meth:`train` keeps it in
eval mode (BatchNorm uses its running statistics, never batch ones) and its output per image is
cached: a frozen tower gives the same features for the same pixels every epoch and for every PMM
copy (PMM hides image TOKENS after the tower, so the cached output is exactly what a recomputation
would give). The cache is keyed by a hash of the image's pixels and holds at most
``feature_cache_size`` images (oldest dropped first); it is off while any tower weight trains.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

ENCODERS = ("efficientnet-lite0", "tiny")


class CNNVisionConfig(PretrainedConfig):
    """Config of :class:`CNNVisionModel`.

    Args:
        encoder: ``"efficientnet-lite0"`` or ``"tiny"``.
        image_size: input side in pixels.
        patch_size: total stride of the encoder (image tokens per side = image_size / patch_size);
            LLaVA's processor and aimkp's adapter read the grid from these two.
        hidden_size: channels of the output map (1280 for EfficientNet-Lite0).
        tiny_channels: channels of the tiny encoder's stages.
        feature_cache_size: images whose features are kept (0: no cache).
    """

    model_type = "aimkp_cnn_vision"

    def __init__(
        self,
        encoder: str = "tiny",
        image_size: int = 64,
        patch_size: int = 32,
        hidden_size: int = 64,
        tiny_channels: int = 16,
        feature_cache_size: int = 4096,
        **kwargs: Any,
    ) -> None:
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        self.encoder = encoder
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.tiny_channels = tiny_channels
        self.feature_cache_size = feature_cache_size
        super().__init__(**kwargs)


class TinyCNN(nn.Module):
    """EfficientNet-shaped toy encoder: stride-2 conv + BatchNorm + ReLU6 stages (as many as the
    stride needs), then a 1 x 1 head conv to ``hidden_size`` channels."""

    def __init__(self, cfg: CNNVisionConfig) -> None:
        super().__init__()
        stages = int(cfg.patch_size).bit_length() - 1  # patch 32 -> 5 stride-2 stages
        if 2**stages != int(cfg.patch_size):
            raise ValueError(f"patch_size must be a power of 2, got {cfg.patch_size}")
        layers: list[nn.Module] = []
        c_in = 3
        for _ in range(stages):
            layers += [
                nn.Conv2d(c_in, cfg.tiny_channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cfg.tiny_channels),
                nn.ReLU6(),
            ]
            c_in = cfg.tiny_channels
        layers += [nn.Conv2d(c_in, cfg.hidden_size, 1, bias=False), nn.BatchNorm2d(cfg.hidden_size)]
        self.body = nn.Sequential(*layers)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.relu6(self.body(x))


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with random weights (the architecture of ``efficientnet_lite_pytorch``;
    an optional dependency, imported here so the rest of aimkp never needs it)."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


class CNNVisionModel(PreTrainedModel):
    """A CNN as a LLaVA vision tower; see the module docstring."""

    config_class = CNNVisionConfig
    base_model_prefix = "cnn"
    main_input_name = "pixel_values"
    _no_split_modules: list[str] = []
    # no attention inside: whatever implementation the language model uses is fine here
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: CNNVisionConfig) -> None:
        super().__init__(config)
        # EfficientNet-Lite0 or the test-size CNN: both have extract_features ([N, C, h, w])
        self.encoder: Any = efficientnet_lite0() if config.encoder != "tiny" else TinyCNN(config)
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # the encoders initialise their own layers (torch defaults; pretrained weights replace them)
        return

    def train(self, mode: bool = True) -> CNNVisionModel:
        """Always eval: the frozen tower's BatchNorm must keep its running statistics."""
        return super().train(False)

    def clear_feature_cache(self) -> None:
        self._features.clear()

    def _cacheable(self) -> bool:
        return self.config.feature_cache_size > 0 and not any(
            p.requires_grad for p in self.parameters()
        )

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, 1 + h * w, C]`` (pooled map first, then the cells)."""
        fmap = self.encoder.extract_features(pixel_values)
        cells = fmap.flatten(2).transpose(1, 2)  # [N, h*w, C], row-major
        return torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1)

    def _encode_cached(self, pixel_values: torch.Tensor) -> torch.Tensor:
        keys = [_pixel_key(pv) for pv in pixel_values]
        todo = [i for i, k in enumerate(keys) if k not in self._features]
        if todo:
            with torch.no_grad():
                fresh = self._encode(pixel_values[todo])
            for i, f in zip(todo, fresh):
                self._features[keys[i]] = f
        out = torch.stack([self._features[k] for k in keys])
        for k in keys:
            self._features.move_to_end(k)
        while len(self._features) > self.config.feature_cache_size:
            self._features.popitem(last=False)
        return out

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        tokens = self._encode_cached(pixel_values) if self._cacheable() else None
        if tokens is None:
            tokens = self._encode(pixel_values)
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=tokens[:, 0], hidden_states=(tokens,)
        )


def _pixel_key(pixels: torch.Tensor) -> str:
    """A digest of one image's pixel tensor (dtype, shape and bytes)."""
    t = pixels.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


AutoConfig.register(CNNVisionConfig.model_type, CNNVisionConfig, exist_ok=True)
AutoModel.register(CNNVisionConfig, CNNVisionModel, exist_ok=True)
