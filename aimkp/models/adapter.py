"""Model adapters: what aimkp needs to know about one multimodal LLM architecture.

An adapter wraps one loaded Hugging Face model (possibly inside a peft wrapper) with its tokenizer
and image processor, and supplies everything the row forward, the training step and prediction
need, so that nothing else in aimkp looks at architecture-specific modules.

What a new adapter (e.g. Qwen2.5-VL, Idefics3/SmolVLM) must supply (subclass :class:`MLLMAdapter`,
decorate with ``@register_adapter("<config.model_type>")``):

- ``model_class``: the ``*ForConditionalGeneration`` class (used to load local checkpoints).
- ``image_token_id``: the id of the placeholder token that image features replace.
- ``projector_path`` / ``vision_tower_path`` (and ``language_model_path`` when the decoder is not
  at ``model.language_model``): where those modules sit in the ``*ForConditionalGeneration``.
- :meth:`preprocess_image`: PIL image -> ``dict(pixel_values=..., image_grid_thw=...|None)``
  and the image-token grid ``(h, w)`` (``h * w`` image tokens).
- :meth:`image_segment`: the token ids of the image segment of the prompt for ``n`` image tokens
  and the offset of the first image token in it (Qwen wraps the pads in vision start/end tokens).
- :meth:`vision_hidden` and :meth:`project`: the vision tower up to the projector's input
  (``[P, Dv]`` per-patch features, exactly as the model's own forward computes them) and the
  trainable projector (``[P, Dv]`` -> ``[M, D]``); ``image_features = project(vision_hidden)``.
  The row forward runs the (frozen) tower once per sample and the projector once per row, so
  each row's projector activations, and per-row gradients, are its own.
- ``vision_tokens_per_image_token``: patches per image token (Qwen merges 2 x 2 -> 4).
- :meth:`projector_rows` (only when some projector weights run before a merge): ``(module,
  tokens per image token)`` for each projector module, the layout of the projector's tokens the
  per-sample gradient engine needs (Qwen2-VL: its LayerNorm ``ln_q`` sees 4 per image token).
- :meth:`position_ids`: positions of the UNMASKED sequence: ``[T]`` (1-D RoPE, the default) or
  ``[3, T]`` (Qwen's multimodal RoPE); kept tokens keep these values when others are hidden.
- :meth:`generation_kwargs`: the extra inputs ``model.generate`` needs for a padded batch.
- Optionally ``image_marker``: the string the architecture's chat template writes for an image
  (used to locate the image when a template only accepts structured content).
- Optionally ``processor_class`` (the architecture's ``transformers`` ``*Processor``) and
  :meth:`processor_kwargs` (what that class needs beyond the tokenizer and image processor):
  checkpoints and exports then hold a processor that ``AutoProcessor.from_pretrained`` loads.

Built in: LLaVA (``llava.py``), Qwen2-VL and Qwen2.5-VL (``qwen2vl.py``; 2.5 overrides only
``model_class`` and :meth:`vision_hidden`, its windowed ViT restores patch order per merged token).
Idefics3 / SmolVLM (``idefics3.py``) supplies the ``<fake_token_around_image><global-img><image>
...`` segment from :meth:`image_segment` (one image, no tiling: ``image_seq_len`` tokens on a
square grid), the vision model's output as :meth:`vision_hidden`, its connector (pixel shuffle +
linear) as :meth:`project`, reshaping per image (``vision_tokens_per_image_token = scale_factor **
2``), and 1-D positions.

The base class does the rest: prompt building (chat template when the tokenizer has one, else
the plain AimKP prompt), :meth:`encode` of a record into an :class:`EncodedSample` with exact
text / image spans, and access to the language model, embedding table and ``lm_head``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from aimkp.data.images import to_rgb
from aimkp.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUESTION = "What phrases should be used to tag the media?"
_IMG = "\u27e6AIMKP_IMG\u27e7"
_TXT = "\u27e6AIMKP_TXT\u27e7"


@dataclass
class EncodedSample:
    """One record encoded for training or prediction.

    Attributes:
        input_ids: LongTensor ``[T]`` (prompt, then the answer when encoded with one).
        labels: LongTensor ``[T]``: -100 except at answer tokens (answer + eos).
        text_span: ``(s, e)``: the post's text tokens are ``input_ids[s:e]`` (may be empty).
        image_span: ``(s, e)`` of the image-placeholder tokens, or None without an image.
        grid: ``(h, w)`` of the image tokens (``h * w == e - s``), or None.
        pixel_values: the image processor's output for this image (shape per architecture) or None.
        image_grid_thw: LongTensor ``[1, 3]`` (Qwen-style models) or None.
        n_answer_tokens: number of label positions != -100.
        position_ids: LongTensor ``[T]`` or ``[3, T]``, positions of the unmasked sequence.
        prompt_len: index where the answer starts (``== T`` without an answer).
        id: the record id.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    text_span: tuple[int, int]
    image_span: tuple[int, int] | None
    grid: tuple[int, int] | None
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    n_answer_tokens: int
    position_ids: torch.Tensor
    prompt_len: int
    id: str = ""

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


#: ``config.model_type`` -> adapter class, filled by :func:`register_adapter`; read through
#: :func:`aimkp.models.registry.adapter_class`, which imports the built-in adapters.
REGISTRY: dict[str, type[MLLMAdapter]] = {}


def register_adapter(model_type: str) -> Callable[[type[MLLMAdapter]], type[MLLMAdapter]]:
    """Class decorator registering an adapter for ``config.model_type == model_type``."""

    def deco(cls: type[MLLMAdapter]) -> type[MLLMAdapter]:
        REGISTRY[model_type] = cls
        cls.model_type = model_type
        return cls

    return deco


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The ``*ForConditionalGeneration`` module inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model  # type: ignore[return-value]


@contextlib.contextmanager
def swapped_module(parent: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    """Temporarily replace ``parent.<name>`` (used to run a vision tower without its projector
    through the model's own forward code)."""
    original = getattr(parent, name)
    setattr(parent, name, replacement)
    try:
        yield
    finally:
        setattr(parent, name, original)


class MLLMAdapter:
    """Base class; see the module docstring for what a subclass supplies."""

    model_type: str = ""
    model_class: type[PreTrainedModel] | None = None
    # The ``transformers`` processor saved into checkpoints / exports (None: tokenizer and image
    # processor files only).
    processor_class: type | None = None
    image_marker: str = "<image>"
    # Dotted paths inside the unwrapped ``*ForConditionalGeneration`` module (``get_submodule``).
    language_model_path: str = "model.language_model"
    projector_path: str = ""
    vision_tower_path: str = ""

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    # ----------------------------------------------------------------- architecture access
    @property
    def base(self) -> nn.Module:
        """The unwrapped ``*ForConditionalGeneration`` module."""
        return unwrap_model(self.model)

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (takes ``inputs_embeds``, returns ``last_hidden_state``)."""
        return self.base.get_submodule(self.language_model_path)

    @property
    def lm_head(self) -> nn.Module:
        head = self.base.lm_head
        assert isinstance(head, nn.Module)  # the output projection, not a tensor
        return head

    @property
    def embed_tokens(self) -> nn.Embedding:
        get_input_embeddings = self.base.get_input_embeddings
        assert callable(get_input_embeddings)  # a transformers model's method
        return get_input_embeddings()

    @property
    def projector(self) -> nn.Module:
        """The trainable multimodal projector (at ``projector_path``)."""
        if not self.projector_path:
            raise NotImplementedError
        return self.base.get_submodule(self.projector_path)

    @property
    def vision_tower(self) -> nn.Module:
        """The frozen vision encoder (at ``vision_tower_path``)."""
        if not self.vision_tower_path:
            raise NotImplementedError
        return self.base.get_submodule(self.vision_tower_path)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def attn_implementation(self) -> str:
        config: Any = self.language_model.config  # a transformers config, not a submodule
        return str(config._attn_implementation)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        if tok.eos_token_id is not None:
            return int(tok.eos_token_id)
        return 0

    def run_image_processor(self, image: Any, **kwargs: Any) -> Any:
        """The model's own image processor on an RGB copy of a PIL image (``return_tensors="pt"``);
        ValueError when the model was loaded without one."""
        if self.image_processor is None:
            raise ValueError("this model was loaded without an image processor")
        # aimkp's decoding (16-bit scaled, transparency on white), not PIL's convert("RGB")
        return self.image_processor(images=to_rgb(image), return_tensors="pt", **kwargs)

    @staticmethod
    def flat_image_features(out: Any) -> torch.Tensor:
        """``get_image_features``' ``pooler_output`` (a tensor, or a list per image) ->
        ``[P, Dv]``."""
        feats = out.pooler_output
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats), dim=0)
        return feats.reshape(-1, feats.shape[-1])

    @staticmethod
    def batch_pixel_values(samples: Sequence[EncodedSample]) -> torch.Tensor | None:
        """The ``pixel_values`` of the samples that have an image, concatenated on dim 0; None when
        no sample has one."""
        pvs = [s.pixel_values for s in samples if s.pixel_values is not None]
        return torch.cat(pvs, dim=0) if pvs else None

    def processor_kwargs(self) -> dict[str, Any]:
        """Arguments of ``processor_class`` beyond the tokenizer, image processor and chat
        template (e.g. LLaVA's ``patch_size``), read from the model config. Default: none."""
        return {}

    def build_processor(self) -> Any:
        """``processor_class`` over this adapter's tokenizer and image processor, keeping the
        tokenizer's chat template; None when the adapter declares no class or the model was
        loaded without an image processor. The class's own errors propagate."""
        if self.processor_class is None or self.image_processor is None:
            return None
        return self.processor_class(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            chat_template=getattr(self.tokenizer, "chat_template", None),
            **self.processor_kwargs(),
        )

    # ----------------------------------------------------------------- to supply
    def preprocess_image(self, image: Any) -> tuple[dict[str, torch.Tensor | None], tuple]:
        """PIL image -> (``{"pixel_values", "image_grid_thw"}``, grid ``(h, w)``)."""
        raise NotImplementedError

    def image_segment(self, n_image_tokens: int) -> tuple[list[int], int]:
        """Token ids of the image segment for ``n`` image tokens, offset of the first one."""
        raise NotImplementedError

    vision_tokens_per_image_token: int = 1

    def projector_rows(self) -> list[tuple[nn.Module, int]]:
        """The projector's modules as the per-sample gradient engine must see them: ``(module,
        tokens per image token)`` for the projector and each of its submodules, in
        ``named_modules`` order. The row forward runs the projector once per row, so a module
        sees ``multiplier * h * w`` tokens of each row with an image. Default: 1 for every
        module (a projector that maps each image token's vision feature on its own, or that
        merges before its weights); an adapter whose projector has weights BEFORE a merge of
        k vision tokens into one image token lists those modules with multiplier k."""
        return [(m, 1) for _, m in self.projector.named_modules()]

    def vision_hidden(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Vision tower up to the projector: ``[P, Dv]`` for all images, in order."""
        raise NotImplementedError

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The multimodal projector: ``[P, Dv]`` -> ``[P / vision_tokens_per_image_token, D]``."""
        return self.projector(hidden)

    def image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Vision tower + projector: ``[M, D]`` features for all images, in order."""
        return self.project(self.vision_hidden(pixel_values, image_grid_thw))

    def position_ids(
        self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Positions of the unmasked sequence ``input_ids [T]``: ``[T]`` or ``[3, T]``.
        Default: 1-D RoPE, ``arange(T)``."""
        return torch.arange(input_ids.shape[-1], dtype=torch.long)

    def generation_kwargs(
        self, samples: Sequence[EncodedSample], input_ids: torch.Tensor
    ) -> dict[str, Any]:
        """Extra ``generate`` inputs (pixel values, grids, ...) for a left-padded batch."""
        raise NotImplementedError

    # ----------------------------------------------------------------- prompt building
    def _tok(self, s: str) -> list[int]:
        if not s:
            return []
        return list(self.tokenizer(s, add_special_tokens=False)["input_ids"])

    def _render_template(self, has_image: bool) -> tuple[str, str, str] | None:
        """Render the chat template around sentinels: (before image/text, between, after text).

        Returns None when the tokenizer has no chat template. The image sits between the first
        and second pieces (dropped when ``has_image`` is False).
        """
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return None
        user = (_IMG if has_image else "") + _TXT + "\n" + QUESTION
        attempts: list[Any] = [user]
        if has_image:
            attempts.append([{"type": "image"}, {"type": "text", "text": _TXT + "\n" + QUESTION}])
        else:
            attempts.append([{"type": "text", "text": user}])
        for content in attempts:
            try:
                rendered = tok.apply_chat_template(
                    [{"role": "user", "content": content}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            except Exception:  # noqa: BLE001 - a template may reject one content form
                continue
            if not isinstance(rendered, str) or _TXT not in rendered:
                continue
            if has_image:
                if _IMG in rendered:
                    img_at = rendered.index(_IMG)
                    rendered = rendered.replace(_IMG, "", 1)
                elif self.image_marker and self.image_marker in rendered:
                    img_at = rendered.index(self.image_marker)
                    rendered = rendered.replace(self.image_marker, "", 1)
                else:
                    continue
                txt_at = rendered.index(_TXT)
                if img_at > txt_at:
                    continue
                return rendered[:img_at], rendered[img_at:txt_at], rendered[txt_at + len(_TXT) :]
            txt_at = rendered.index(_TXT)
            return rendered[:txt_at], "", rendered[txt_at + len(_TXT) :]
        raise ValueError(
            f"the chat template of {type(tok).__name__} could not be rendered around the AimKP "
            "prompt (neither string nor structured content worked)"
        )

    def answer_text(self, keyphrases: Sequence[str]) -> str:
        """The answer string: keyphrases joined by ', '."""
        return ", ".join(k.strip() for k in keyphrases if k and k.strip())

    def encode(
        self,
        record: Any,
        *,
        with_answer: bool = True,
        use_image: bool = True,
        use_text: bool = True,
    ) -> EncodedSample:
        """Encode a :class:`aimkp.data.Record` (``id``, ``text``, ``keyphrases``, image).

        Prompt ``<image>{text}\\nWhat phrases should be used to tag the media?`` (inside the
        chat template when there is one); the answer ``kp1, kp2`` + eos. Without an image the
        placeholder is dropped; without text the text span is empty.
        """
        text = (getattr(record, "text", "") or "") if use_text else ""
        image = None
        if use_image:
            load = getattr(record, "load_image", None)
            image = load() if callable(load) else getattr(record, "image", None)
        has_image = image is not None

        pixel: dict[str, torch.Tensor | None] = {"pixel_values": None, "image_grid_thw": None}
        grid: tuple[int, int] | None = None
        img_ids: list[int] = []
        img_off = 0
        if has_image:
            pixel, grid = self.preprocess_image(image)
            img_ids, img_off = self.image_segment(grid[0] * grid[1])

        pieces = self._render_template(has_image)
        ids: list[int] = []
        tok = self.tokenizer
        if pieces is None:
            if tok.bos_token_id is not None:
                ids.append(int(tok.bos_token_id))
            before, between, after = "", "", "\n" + QUESTION
        else:
            before, between, after = pieces
            bos = tok.bos_token
            if tok.bos_token_id is not None and not (bos and before.startswith(bos)):
                ids.append(int(tok.bos_token_id))
        ids += self._tok(before)
        image_span = None
        if has_image:
            s = len(ids) + img_off
            assert grid is not None  # set with the image above
            image_span = (s, s + grid[0] * grid[1])
            ids += img_ids
        ids += self._tok(between)
        ts = len(ids)
        ids += self._tok(text)
        text_span = (ts, len(ids))
        ids += self._tok(after)
        prompt_len = len(ids)
        labels = [-100] * prompt_len
        if with_answer:
            kps = list(getattr(record, "keyphrases", []) or [])
            if not any(k and k.strip() for k in kps):
                raise ValueError(
                    f"record {getattr(record, 'id', '?')!r}: no keyphrases to train on "
                    "(encode with with_answer=False for prediction)"
                )
            # "ASSISTANT:" (LLaVA-1.5) is followed by a space before the answer, as in training
            sep = " " if after.rstrip(" ").endswith(":") and not after.endswith(" ") else ""
            ans = self._tok(sep + self.answer_text(kps))
            if tok.eos_token_id is None:
                raise ValueError("the tokenizer has no eos token; cannot end the answer")
            ans.append(int(tok.eos_token_id))
            ids += ans
            labels += ans
        limit = getattr(self.language_model.config, "max_position_embeddings", None)
        if limit is not None and len(ids) > int(limit):  # the user's data: file:line, exit 2
            where = getattr(record, "source", None) or f"record {getattr(record, 'id', '?')!r}"
            raise DataError(
                f"{where}: the post is {len(ids)} tokens (prompt, image and answer), over the "
                f"model's context of {limit} (max_position_embeddings); shorten or remove it"
            )
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels_t = torch.tensor(labels, dtype=torch.long)
        grid_thw = pixel.get("image_grid_thw")
        pos = self.position_ids(input_ids, grid_thw)
        return EncodedSample(
            input_ids=input_ids,
            labels=labels_t,
            text_span=text_span,
            image_span=image_span,
            grid=grid,
            pixel_values=pixel.get("pixel_values"),
            image_grid_thw=grid_thw,
            n_answer_tokens=int((labels_t != -100).sum()),
            position_ids=pos,
            prompt_len=prompt_len,
            id=str(getattr(record, "id", "")),
        )

    def sample_image_features(
        self, samples: Sequence[EncodedSample], device: torch.device | str | None = None
    ) -> list[torch.Tensor | None]:
        """Vision features ``[h*w, D]`` per sample (None for samples without an image).

        All images go through the vision tower and projector in one call each.
        """
        hidden = self.sample_vision_hidden(samples, device)
        kept = [h for h in hidden if h is not None]
        out: list[torch.Tensor | None] = [None] * len(samples)
        if not kept:
            return out
        feats = self.project(torch.cat(kept, dim=0))
        sizes = []
        for s, h in zip(samples, hidden):
            if h is not None:
                assert s.grid is not None  # a sample with an image has its token grid
                sizes.append(s.grid[0] * s.grid[1])
        for i, f in zip([i for i, h in enumerate(hidden) if h is not None], feats.split(sizes)):
            out[i] = f
        return out

    def sample_vision_hidden(
        self, samples: Sequence[EncodedSample], device: torch.device | str | None = None
    ) -> list[torch.Tensor | None]:
        """Projector inputs ``[h*w*k, Dv]`` per sample (k = vision_tokens_per_image_token),
        None for samples without an image. All images go through the tower in one call."""
        with_img = [i for i, s in enumerate(samples) if s.pixel_values is not None]
        out: list[torch.Tensor | None] = [None] * len(samples)
        if not with_img:
            return out
        dev = device if device is not None else self.embed_tokens.weight.device
        pvs: list[torch.Tensor] = []
        for i in with_img:
            sample_pv = samples[i].pixel_values
            assert sample_pv is not None  # with_img
            pvs.append(sample_pv)
        pv = torch.cat(pvs, dim=0).to(dev)
        thw = None
        if samples[with_img[0]].image_grid_thw is not None:
            thws: list[torch.Tensor] = []
            for i in with_img:  # one model's samples: all have a grid when the first has
                sample_thw = samples[i].image_grid_thw
                assert sample_thw is not None
                thws.append(sample_thw)
            thw = torch.cat(thws, dim=0).to(dev)
        feats = self.vision_hidden(pv, thw)
        k = self.vision_tokens_per_image_token
        sizes = []
        for i in with_img:
            grid = samples[i].grid
            assert grid is not None  # a sample with an image has its token grid
            sizes.append(grid[0] * grid[1] * k)
        if feats.shape[0] != sum(sizes):
            raise ValueError(
                f"the vision tower gave {feats.shape[0]} rows but the samples' image tokens "
                f"need {sum(sizes)}"
            )
        for i, f in zip(with_img, torch.split(feats, sizes)):
            out[i] = f
        return out
