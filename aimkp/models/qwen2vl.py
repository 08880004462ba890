"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) adapter.

The image segment is ``<|vision_start|>`` + ``h*w`` ``<|image_pad|>`` + ``<|vision_end|>``, with
``(h, w) = image_grid_thw[1:] / spatial_merge_size``. Positions are the 3 x T multimodal RoPE
indices from the model's own ``get_rope_index`` on the full (unmasked) sequence; masking keeps the
kept tokens' values (the model would renumber them if hidden tokens were removed from its mask).
Qwen2.5-VL (:class:`Qwen25VLAdapter`) differs in the class and in one detail of the vision
path: its windowed ViT permutes patches into windows and restores the order after the merger,
per merged token, so the projector input is taken with the merge windows grouped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from aimkp.models.adapter import EncodedSample, MLLMAdapter, register_adapter, swapped_module


@register_adapter("qwen2_vl")
class Qwen2VLAdapter(MLLMAdapter):
    """Adapter for ``Qwen2VLForConditionalGeneration`` (ViT with 2x2 patch merger)."""

    model_class: type[PreTrainedModel] | None = Qwen2VLForConditionalGeneration
    processor_class: type | None = Qwen2VLProcessor
    image_marker = "<|vision_start|><|image_pad|><|vision_end|>"
    projector_path = "model.visual.merger"
    vision_tower_path = "model.visual"

    @property
    def merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def preprocess_image(self, image: Any) -> tuple[dict[str, torch.Tensor | None], tuple]:
        out = self.run_image_processor(image)
        thw = torch.as_tensor(out["image_grid_thw"]).long().reshape(1, 3)
        if int(thw[0, 0]) != 1:
            raise ValueError(f"expected one temporal patch for an image, got grid {thw.tolist()}")
        h, w = int(thw[0, 1]) // self.merge, int(thw[0, 2]) // self.merge
        return {"pixel_values": torch.as_tensor(out["pixel_values"]), "image_grid_thw": thw}, (h, w)

    def image_segment(self, n_image_tokens: int) -> tuple[list[int], int]:
        cfg = self.config
        ids = [int(cfg.vision_start_token_id)]
        ids += [self.image_token_id] * n_image_tokens
        ids.append(int(cfg.vision_end_token_id))
        return ids, 1

    @property
    def vision_tokens_per_image_token(self) -> int:  # type: ignore[override]
        return self.merge * self.merge

    def projector_rows(self) -> list[tuple[nn.Module, int]]:
        """The merger's LayerNorm ``ln_q`` (RMSNorm in 2.5) runs on the vision tokens before the
        2 x 2 merge (4 per image token); its MLP after it (1 per image token)."""
        merger = self.projector
        k = self.vision_tokens_per_image_token
        return [(m, k if m is merger.ln_q else 1) for _, m in merger.named_modules()]

    def vision_hidden(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Flattened patches ``[P, C*t*p*p]`` + ``image_grid_thw [N, 3]`` -> ``[P, Dv]``: the
        ViT blocks' output, computed by the model's own vision forward with the patch merger
        (the projector) swapped out for the identity. Each image's patches stay contiguous in
        merge-window order, so :meth:`project` (the merger) can run on any concatenation."""
        if image_grid_thw is None:
            raise ValueError("Qwen2-VL image features need image_grid_thw")
        visual = self._visual()
        with swapped_module(visual, "merger", nn.Identity()):
            out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw, return_dict=True)
        return out.pooler_output

    def _visual(self) -> PreTrainedModel:
        """The vision model (``base.model.visual``)."""
        model = self.base.model
        assert isinstance(model, nn.Module)  # the Qwen2-VL model inside the wrapper
        visual = model.visual
        assert isinstance(visual, PreTrainedModel)  # transformers' vision transformer
        return visual

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 at image-placeholder tokens, 2 at video ones, else 0 (same shape as input_ids)."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == self.image_token_id] = 1
        vid = getattr(self.config, "video_token_id", None)
        if vid is not None:
            types[input_ids == int(vid)] = 2
        return types

    def position_ids(
        self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[3, T]`` multimodal RoPE positions of the full sequence (model's get_rope_index)."""
        ids = input_ids.reshape(1, -1).cpu()
        model = self.base.model
        assert isinstance(model, nn.Module)  # the Qwen2-VL model inside the wrapper
        get_rope_index = model.get_rope_index
        assert callable(get_rope_index)  # a method, not a submodule attribute
        pos, _ = get_rope_index(
            ids,
            mm_token_type_ids=self.mm_token_type_ids(ids),
            image_grid_thw=None if image_grid_thw is None else image_grid_thw.cpu(),
            attention_mask=None,
        )
        return pos[:, 0, :].long()

    def generation_kwargs(
        self, samples: Sequence[EncodedSample], input_ids: torch.Tensor
    ) -> dict[str, Any]:
        kw: dict[str, Any] = {"mm_token_type_ids": self.mm_token_type_ids(input_ids)}
        with_img = [s for s in samples if s.pixel_values is not None]
        if with_img:
            dev = input_ids.device
            pvs: list[torch.Tensor] = []
            thws: list[torch.Tensor] = []
            for s in with_img:
                assert s.pixel_values is not None  # with_img
                assert s.image_grid_thw is not None  # a Qwen2-VL image comes with its grid
                pvs.append(s.pixel_values)
                thws.append(s.image_grid_thw)
            kw["pixel_values"] = torch.cat(pvs, 0).to(dev)
            kw["image_grid_thw"] = torch.cat(thws, 0).to(dev)
        return kw


class _GroupMergeWindows(nn.Module):
    """Weight-free stand-in for a patch merger: ``[P, Dv]`` -> ``[P / k, k * Dv]`` (each merge
    window's k patches in one row), so order restorations applied per merged token move whole
    windows, exactly as they move the real merger's outputs."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.k * x.shape[-1])


@register_adapter("qwen2_5_vl")
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Adapter for ``Qwen2_5_VLForConditionalGeneration`` (windowed ViT + patch merger)."""

    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor

    def vision_hidden(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[P, Dv]`` merger inputs in the model's final (un-windowed) patch order."""
        if image_grid_thw is None:
            raise ValueError("Qwen2.5-VL image features need image_grid_thw")
        visual = self._visual()
        k = self.vision_tokens_per_image_token
        with swapped_module(visual, "merger", _GroupMergeWindows(k)):
            out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw, return_dict=True)
        g = out.pooler_output
        return g.reshape(g.shape[0] * k, -1)
