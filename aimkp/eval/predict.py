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
import inspect
import re
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

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


def _check_options(o: Any) -> None:
    """UsageError naming the first of ``o``'s generation options (attributes named as
    :class:`Predictor`'s arguments) that is out of range."""
    if o.decoding not in DECODINGS:
        raise UsageError(f"decoding must be one of {DECODINGS}, got {o.decoding!r}")
    if o.modality not in MODALITIES:
        raise UsageError(f"modality must be one of {MODALITIES}, got {o.modality!r}")
    if o.batch_size < 1 or o.max_new_tokens < 1:
        raise UsageError(
            f"batch_size and max_new_tokens must be >= 1, got {o.batch_size}, {o.max_new_tokens}"
        )
    if o.decoding == "beam" and o.num_beams < 1:
        raise UsageError(f"num_beams must be >= 1, got {o.num_beams}")
    if o.decoding == "sample" and (o.temperature <= 0 or not 0 < o.top_p <= 1):
        raise UsageError(
            f"sampling needs temperature > 0 and 0 < top_p <= 1, got {o.temperature}, {o.top_p}"
        )


class Predictor:
    """Batched keyphrase generation for one loaded model.

    Args:
        loaded: :class:`aimkp.models.LoadedModel`.
        decoding: ``"greedy"``, ``"beam"`` (``num_beams``) or ``"sample"`` (``temperature``,
            ``top_p``, reproducible with ``seed``).
        max_new_tokens: generation budget per record.
        batch_size: prompts per ``generate`` call (left-padded).
        modality: ``"multimodal"`` (use what a record has), ``"text"`` (never the image) or
            ``"image"`` (never the text): the paper's input settings.
        device: where generation runs (default: the model's device).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        decoding: str = "greedy",
        num_beams: int = 4,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 8,
        modality: str = "multimodal",
        device: torch.device | str | None = None,
    ) -> None:
        self.loaded = loaded
        self.decoding = decoding
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.batch_size = batch_size
        self.modality = modality
        _check_options(self)
        self.device = torch.device(device) if device is not None else loaded.device

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """UsageError naming the first option out of range (no model needed). ``options`` are
        ``__init__``'s keyword arguments; missing ones take its defaults, unknown ones are
        ignored."""
        params = inspect.signature(cls.__init__).parameters.values()
        probe = SimpleNamespace(**{p.name: p.default for p in params if p.default is not p.empty})
        vars(probe).update(options)
        _check_options(probe)

    def _gen_config(self) -> dict[str, Any]:
        tok = self.loaded.tokenizer
        kw: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": self.loaded.adapter.pad_token_id,
            "use_cache": True,
        }
        if self.decoding == "greedy":
            kw.update(do_sample=False, num_beams=1)
        elif self.decoding == "beam":
            kw.update(do_sample=False, num_beams=self.num_beams, early_stopping=True)
        else:
            kw.update(do_sample=True, num_beams=1, temperature=self.temperature, top_p=self.top_p)
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
                use_image=self.modality != "text",
                use_text=self.modality != "image",
            )
        except ValueError as exc:
            # the adapter's own length check, the only ValueError it raises for a long prompt
            if limit is not None and "max_position_embeddings" in str(exc):
                raise PostTooLong(f"{exc}; nothing left for the answer") from None
            raise
        if limit is not None and sample.length + self.max_new_tokens > limit:
            raise PostTooLong(
                f"record {sample.id!r}: {sample.length} prompt tokens + max_new_tokens "
                f"{self.max_new_tokens} exceed the model's context ({limit} positions)"
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
                torch.manual_seed(self.seed)
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
            for i in range(0, len(samples), self.batch_size):
                texts += self.generate_batch(samples[i : i + self.batch_size])
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
    decoding: str = "greedy",
    **kw: Any,
) -> Predictor:
    """Load a checkpoint (``save_checkpoint`` output or a local HF directory) as a Predictor."""
    from aimkp.models import load_model

    loaded = load_model(checkpoint_dir, device=device)
    return Predictor(loaded, decoding=decoding, device=device, **kw)
