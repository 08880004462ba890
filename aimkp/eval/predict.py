"""Keyphrase prediction with a trained model: the model's own ``generate``, parsed ranked output.

>>> pred = load_predictor("runs/ckpt", decoding="greedy")
>>> pred.predict(records)            # -> [["wildflower hour", "spring"], ...]

Generation goes through ``model.generate`` with ``input_ids`` + the architecture's vision inputs
(pixel values; Qwen2-VL also ``image_grid_thw`` and ``mm_token_type_ids``), prompts left-padded
in batches. Records without an image are prompted text-only (the ``<image>`` placeholder is
dropped), records without text image-only. Output text is split on ``,`` and ``;``, stripped,
lower-cased, de-duplicated keeping order, empty pieces dropped.

Large collections go through :mod:`aimkp.eval.streaming` (what ``aimkp predict`` runs), built on
:meth:`Predictor.encode` (a post's prompt, images preprocessed once; :class:`PostTooLong` when it
does not fit the context), :meth:`Predictor.session` and :meth:`Predictor.generate_batch`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from typing_extensions import Unpack

from aimkp.errors import UsageError

if TYPE_CHECKING:
    from aimkp.models import EncodedSample, LoadedModel

DECODINGS = ("greedy", "beam", "sample")
MODALITIES = ("multimodal", "text", "image")
_SPLIT = re.compile(r"[,;]")


class PostTooLong(UsageError):
    """A post whose prompt (plus the answer budget) does not fit the model's context."""


def parse_keyphrases(text: str) -> list[str]:
    """``"Wildflower hour, spring; spring , "`` -> ``["wildflower hour", "spring"]``."""
    out: list[str] = []
    seen: set[str] = set()
    for piece in _SPLIT.split(text):
        kp = " ".join(piece.strip().lower().split())
        if kp and kp not in seen:
            seen.add(kp)
            out.append(kp)
    return out


class GenerationKwargs(TypedDict, total=False):
    """The fields of :class:`GenerationOptions` as keyword arguments (``**options:
    Unpack[GenerationKwargs]``, so that mypy checks each caller's keywords)."""

    decoding: str
    num_beams: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    batch_size: int
    modality: str


@dataclass(frozen=True)
class GenerationOptions:
    """How a :class:`Predictor` generates; a value out of range is a UsageError naming it.

    Attributes:
        decoding: ``"greedy"``, ``"beam"`` (``num_beams``) or ``"sample"`` (``temperature``,
            ``top_p``, reproducible with ``seed``).
        max_new_tokens: generation budget per record.
        batch_size: prompts per ``generate`` call (left-padded).
        modality: ``"multimodal"`` (use what a record has), ``"text"`` (never the image) or
            ``"image"`` (never the text): the paper's input settings.
    """

    decoding: str = "greedy"
    num_beams: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    modality: str = "multimodal"

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise UsageError(f"decoding must be one of {DECODINGS}, got {self.decoding!r}")
        if self.modality not in MODALITIES:
            raise UsageError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise UsageError(
                "batch_size and max_new_tokens must be >= 1, "
                f"got {self.batch_size}, {self.max_new_tokens}"
            )
        if self.decoding == "beam" and self.num_beams < 1:
            raise UsageError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.decoding == "sample" and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise UsageError(
                "sampling needs temperature > 0 and 0 < top_p <= 1, "
                f"got {self.temperature}, {self.top_p}"
            )


class Predictor:
    """Batched keyphrase generation for one loaded model.

    >>> Predictor(loaded, decoding="beam", num_beams=3)       # the GenerationOptions fields
    >>> Predictor(loaded, options, batch_size=1)              # options, one field changed

    Args:
        loaded: :class:`aimkp.models.LoadedModel`.
        options: how it generates (default: :class:`GenerationOptions`' defaults).
        device: where generation runs (default: the model's device).
        **overrides: fields of :class:`GenerationOptions` that replace those of ``options``.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        options: GenerationOptions | None = None,
        *,
        device: torch.device | str | None = None,
        **overrides: Unpack[GenerationKwargs],
    ) -> None:
        self.loaded = loaded
        self.options = dataclasses.replace(options or GenerationOptions(), **overrides)
        self.device = torch.device(device) if device is not None else loaded.device

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """UsageError naming the first option out of range (no model needed). ``options`` are
        :class:`GenerationOptions` fields; missing ones take its defaults, unknown ones are
        ignored."""
        names = {f.name for f in dataclasses.fields(GenerationOptions)}
        GenerationOptions(**{k: v for k, v in options.items() if k in names})

    def _gen_config(self) -> dict[str, Any]:
        tok, o = self.loaded.tokenizer, self.options
        kw: dict[str, Any] = {
            "max_new_tokens": o.max_new_tokens,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": self.loaded.adapter.pad_token_id,
            "use_cache": True,
        }
        if o.decoding == "greedy":
            kw.update(do_sample=False, num_beams=1)
        elif o.decoding == "beam":
            kw.update(do_sample=False, num_beams=o.num_beams, early_stopping=True)
        else:
            kw.update(do_sample=True, num_beams=1, temperature=o.temperature, top_p=o.top_p)
            kw["top_k"] = 0
        return kw

    def encode(self, record: Any) -> EncodedSample:
        """``record``'s prompt (this predictor's modality), images preprocessed here once.

        Raises:
            PostTooLong: the prompt plus ``max_new_tokens`` does not fit the model's context.
            ValueError: a record marked for the keep-mask decoder (``meta['hidden_modality']``).
        """
        if (getattr(record, "meta", None) or {}).get("hidden_modality"):
            raise ValueError(
                "records marked with meta['hidden_modality'] (text_hidden / image_hidden) need "
                "the keep-mask decoder: aimkp.eval.hidden.predict_fn_for(predictor)"
            )
        limit = self.context_length
        try:
            sample = self.loaded.adapter.encode(
                record,
                with_answer=False,
                use_image=self.options.modality != "text",
                use_text=self.options.modality != "image",
            )
        except ValueError as exc:
            # the adapter's own length check, the only ValueError it raises for a long prompt
            if limit is not None and "max_position_embeddings" in str(exc):
                raise PostTooLong(f"{exc}; nothing left for the answer") from None
            raise
        if limit is not None and sample.length + self.options.max_new_tokens > limit:
            raise PostTooLong(
                f"record {sample.id!r}: {sample.length} prompt tokens + max_new_tokens "
                f"{self.options.max_new_tokens} exceed the model's context ({limit} positions)"
            )
        return sample

    @property
    def context_length(self) -> int | None:
        """Positions the language model has (``max_position_embeddings``), None when unbounded."""
        limit = getattr(self.loaded.adapter.language_model.config, "max_position_embeddings", None)
        return int(limit) if limit is not None else None

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Evaluation mode, no autograd and the sampling RNG seeded with ``seed`` (the caller's
        RNG state restored after): wrap the :meth:`generate_batch` calls of one prediction."""
        model = self.loaded.adapter.base
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=self._rng_devices()), torch.no_grad():
                torch.manual_seed(self.options.seed)
                yield
        finally:
            model.train(was_training)

    def generate_batch(self, samples: Sequence[EncodedSample]) -> list[str]:
        """Raw decoded answers of one left-padded ``generate`` call (inside :meth:`session`)."""
        return self._generate_batch(self.loaded.adapter.base, samples)

    def generate_text(self, records: Sequence[Any]) -> list[str]:
        """Raw decoded answers (special tokens skipped), one per record, in order."""
        samples = [self.encode(r) for r in records]
        texts: list[str] = []
        with self.session():
            for i in range(0, len(samples), self.options.batch_size):
                texts += self.generate_batch(samples[i : i + self.options.batch_size])
        return texts

    def _rng_devices(self) -> list[int]:
        if self.device.type == "cuda":
            return [self.device.index if self.device.index is not None else 0]
        return []

    def _generate_batch(self, model: Any, samples: Sequence[Any]) -> list[str]:
        adapter = self.loaded.adapter
        pad = adapter.pad_token_id
        n = max(s.length for s in samples)
        ids = torch.full((len(samples), n), pad, dtype=torch.long)
        mask = torch.zeros((len(samples), n), dtype=torch.long)
        for b, s in enumerate(samples):  # left padding: generation appends on the right
            ids[b, n - s.length :] = s.input_ids
            mask[b, n - s.length :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        extra = adapter.generation_kwargs(samples, ids)
        if "pixel_values" in extra:
            vt = next(adapter.vision_tower.parameters())
            extra["pixel_values"] = extra["pixel_values"].to(vt.dtype)
        out = model.generate(input_ids=ids, attention_mask=mask, **extra, **self._gen_config())
        new = out[:, n:]
        return self.loaded.tokenizer.batch_decode(new, skip_special_tokens=True)

    def predict(self, records: Sequence[Any]) -> list[list[str]]:
        """Ranked keyphrases per record (see :func:`parse_keyphrases`)."""
        return [parse_keyphrases(t) for t in self.generate_text(records)]


def load_predictor(
    checkpoint_dir: str,
    device: torch.device | str | None = None,
    **options: Unpack[GenerationKwargs],
) -> Predictor:
    """Load a checkpoint (``save_checkpoint`` output or a local HF directory) as a Predictor
    generating with ``options`` (:class:`GenerationOptions` fields)."""
    from aimkp.models import load_model

    loaded = load_model(checkpoint_dir, device=device)
    return Predictor(loaded, device=device, **options)
