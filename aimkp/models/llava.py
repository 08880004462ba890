"""LLaVA (LLaVA-1.5 style, ``LlavaForConditionalGeneration``) adapter.

Image tokens: one ``<image>`` placeholder per vision patch (CLS dropped with the ``default``
feature-selection strategy), ``h x w = (image_size / patch_size)^2`` (24 x 24 = 576 for
LLaVA-1.5-336, 8 x 8 = 64 for the ``tiny-llava`` preset). Positions are a 1-D ``arange(T)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from aimkp.models import vision_cnn  # noqa: F401 - registers the CNN tower a LLaVA config may name
from aimkp.models.adapter import EncodedSample, MLLMAdapter, register_adapter, swapped_module


@register_adapter("llava")
class LlavaAdapter(MLLMAdapter):
    """Adapter for ``LlavaForConditionalGeneration`` (CLIP vision tower + MLP projector)."""

    model_class = LlavaForConditionalGeneration
    processor_class = LlavaProcessor
    image_marker = "<image>"
    projector_path = "model.multi_modal_projector"
    vision_tower_path = "model.vision_tower"

    def _grid(self) -> tuple[int, int]:
        cfg = self.config
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(
                "LlavaAdapter supports vision_feature_select_strategy='default' only (the image "
                f"tokens must form a grid); got {cfg.vision_feature_select_strategy!r}"
            )
        vc = cfg.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        return side, side

    def processor_kwargs(self) -> dict[str, Any]:
        """``LlavaProcessor`` expands ``<image>`` to ``(image_size / patch_size)^2 + 1`` tokens
        minus the CLS the ``default`` strategy drops: the :meth:`_grid` this adapter encodes."""
        cfg = self.config
        return {
            "patch_size": int(cfg.vision_config.patch_size),
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "num_additional_image_tokens": 1,  # CLIP's CLS token
            "image_token": self.tokenizer.convert_ids_to_tokens(self.image_token_id),
        }

    def preprocess_image(self, image: Any) -> tuple[dict[str, torch.Tensor | None], tuple]:
        out = self.run_image_processor(image)
        pv = torch.as_tensor(out["pixel_values"])
        if pv.ndim == 3:
            pv = pv.unsqueeze(0)
        return {"pixel_values": pv, "image_grid_thw": None}, self._grid()

    def image_segment(self, n_image_tokens: int) -> tuple[list[int], int]:
        return [self.image_token_id] * n_image_tokens, 0

    def vision_hidden(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``pixel_values [N, 3, H, W]`` -> ``[N * h * w, Dv]``: the selected vision layer (CLS
        dropped), computed by the model's own ``get_image_features`` with the projector swapped
        out for the identity."""
        cfg = self.config
        vt_dtype = next(self.vision_tower.parameters()).dtype
        model = self.base.model
        assert isinstance(model, nn.Module)  # the LlavaModel inside the wrapper
        with swapped_module(model, "multi_modal_projector", nn.Identity()):
            get_image_features = model.get_image_features
            assert callable(get_image_features)  # a method, not a submodule attribute
            out = get_image_features(
                pixel_values=pixel_values.to(vt_dtype),
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                return_dict=True,
            )
        return self.flat_image_features(out)

    def generation_kwargs(
        self, samples: Sequence[EncodedSample], input_ids: torch.Tensor
    ) -> dict[str, Any]:
        pv = self.batch_pixel_values(samples)
        return {} if pv is None else {"pixel_values": pv.to(input_ids.device)}
