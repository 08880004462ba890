"""Idefics3 / SmolVLM (``Idefics3ForConditionalGeneration``) adapter.

One image per post, NOT tiled: the image processor resizes it to one global square image of the
vision model's ``image_size`` (``do_image_splitting=False``), and the prompt holds the segment the
HF ``Idefics3Processor`` writes for an untiled image::

    <fake_token_around_image><global-img><image> * image_seq_len <fake_token_around_image>

``image_seq_len = (image_size / patch_size)^2 / scale_factor^2`` image tokens on a square grid
(SmolVLM-256M: 512 / 16 = 32 patches a side, scale 4: 8 x 8 = 64; ``tiny-idefics3``: 64 / 8 = 8,
scale 2: 4 x 4 = 16). The vision model's last hidden state (``[P, Dv]``, ``P = (image_size /
patch_size)^2`` per image) is the projector input; the connector (pixel shuffle of
``scale_factor x scale_factor`` patches, then a bias-free linear) is the projector, so
``vision_tokens_per_image_token = scale_factor^2``. Positions are a 1-D ``arange(T)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

from aimkp.models.adapter import EncodedSample, MLLMAdapter, register_adapter, swapped_module

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"


@register_adapter("idefics3")
class Idefics3Adapter(MLLMAdapter):
    """Adapter for ``Idefics3ForConditionalGeneration`` (SigLIP-style ViT + pixel-shuffle
    connector; SmolVLM checkpoints use the same class)."""

    model_class = Idefics3ForConditionalGeneration
    processor_class = Idefics3Processor
    image_marker = "<image>"
    language_model_path = "model.text_model"
    projector_path = "model.connector"
    vision_tower_path = "model.vision_model"

    @property
    def scale(self) -> int:
        return int(self.config.scale_factor)

    @property
    def patches_per_side(self) -> int:
        vc = self.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    @property
    def vision_tokens_per_image_token(self) -> int:  # type: ignore[override]
        return self.scale * self.scale

    def processor_kwargs(self) -> dict[str, Any]:
        """``Idefics3Processor`` writes ``image_seq_len`` ``<image>`` tokens per image: the
        :meth:`_grid` this adapter encodes."""
        h, w = self._grid()
        return {"image_seq_len": h * w}

    def _grid(self) -> tuple[int, int]:
        side, s = self.patches_per_side, self.scale
        if side % s:
            raise ValueError(
                f"Idefics3: {side} patches a side is not divisible by scale_factor {s}"
            )
        return side // s, side // s

    def _special_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token!r} token (Idefics3 image segment)")
        return int(tid)

    def preprocess_image(self, image: Any) -> tuple[dict[str, torch.Tensor | None], tuple]:
        """PIL image -> ``pixel_values [1, 3, S, S]`` (S = vision ``image_size``), grid."""
        size = int(self.config.vision_config.image_size)
        out = self.run_image_processor(
            image, do_image_splitting=False, max_image_size={"longest_edge": size}
        )
        pv = torch.as_tensor(out["pixel_values"])
        pv = pv.reshape(-1, *pv.shape[-3:])
        if pv.shape[0] != 1 or tuple(pv.shape[-2:]) != (size, size):
            raise ValueError(
                f"Idefics3: expected one untiled {size} x {size} image from the processor, got "
                f"pixel_values {tuple(pv.shape)}"
            )
        return {"pixel_values": pv, "image_grid_thw": None}, self._grid()

    def image_segment(self, n_image_tokens: int) -> tuple[list[int], int]:
        fake = self._special_id(FAKE_IMAGE_TOKEN)
        ids = [fake, self._special_id(GLOBAL_IMAGE_TOKEN)]
        ids += [self.image_token_id] * n_image_tokens
        ids.append(fake)
        return ids, 2

    def vision_hidden(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``pixel_values [N, 3, S, S]`` -> ``[N * P, Dv]``: the vision model's last hidden state,
        computed by the model's own ``get_image_features`` (its patch-attention mask included)
        with the connector swapped out for the identity."""
        model = self.base.model
        assert isinstance(model, nn.Module)  # the Idefics3Model inside the wrapper
        get_image_features = model.get_image_features
        assert callable(get_image_features)  # a method, not a submodule attribute
        pv = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        with swapped_module(model, "connector", nn.Identity()):
            out = get_image_features(pixel_values=pv.unsqueeze(1), return_dict=True)
        return self.flat_image_features(out)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The connector per image: ``[N * P, Dv]`` -> pixel shuffle -> linear ->
        ``[N * P / scale^2, D]`` (image after image, each in the model's token order)."""
        p = self.patches_per_side**2
        if hidden.shape[0] % p:
            raise ValueError(
                f"Idefics3 connector input has {hidden.shape[0]} rows, not a multiple of the "
                f"{p} patches of one image"
            )
        out = self.projector(hidden.reshape(-1, p, hidden.shape[-1]))
        return out.reshape(-1, out.shape[-1])

    def generation_kwargs(
        self, samples: Sequence[EncodedSample], input_ids: torch.Tensor
    ) -> dict[str, Any]:
        """``pixel_values [n_images, 1, 3, S, S]`` of the samples with an image, in order."""
        pv = self.batch_pixel_values(samples)
        return {} if pv is None else {"pixel_values": pv.unsqueeze(1).to(input_ids.device)}
