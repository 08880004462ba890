"""Greedy decoding with a modality HIDDEN the way training hides it (positions kept).

The settings ``text_hidden`` / ``image_hidden`` (:mod:`aimkp.data.corrupt`) leave the records as
they are and name the modality in ``record.meta["hidden_modality"]``; this module decodes them
with the masked copy's form that Progressive Modality Masking trains on at a stride beyond the
span: the keep mask of :func:`aimkp.method.pmm.build_keep` keeps ONE text token (the last) or ONE
image token (the last grid cell); hidden tokens are dropped by the fused
:func:`aimkp.ops.masked_embedding` (``compact=True``) and every kept token keeps the position id
of the unmasked sequence, collated by :func:`aimkp.models.forward.collate_rows` exactly as a
training row. Generated tokens continue after the unmasked prompt's last position.

``model.generate`` takes no keep mask (it derives positions itself), so this is its own greedy
loop with a KV cache: the prompt rows run once (compact, padded to ``[R, K_max]``, explicit 4-D
mask), then one token per step. With every token kept it gives ``Predictor``'s greedy output
(tested), so the hidden settings differ from ``clean`` by the mask only.

>>> fn = predict_fn_for(predictor)          # routes hidden-setting records here
>>> run_robustness(fn, records, settings=["clean", "text_hidden"])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from aimkp.errors import UsageError
from aimkp.eval.predict import parse_keyphrases

HIDDEN_KINDS = ("text", "image")
# a stride beyond any span: build_keep then keeps the span's last token only
_BEYOND_SPAN = 1 << 30


def hidden_keep(sample: Any, kind: str | None) -> Tensor:
    """Keep mask BoolTensor ``[T]``: ``kind`` hidden except its last token (all kept when the
    sample has no such span, or ``kind`` is None)."""
    from aimkp.method.pmm import build_keep, has_image, has_text

    if kind is None or not (has_text(sample) if kind == "text" else has_image(sample)):
        return build_keep(sample, None)
    return build_keep(sample, kind, _BEYOND_SPAN)


def _new_cache(language_model: Any) -> tuple[str, Any]:
    """A DynamicCache and the keyword the language model takes it under (``cache`` in
    transformers >= 5.2x, ``past_key_values`` before)."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=language_model.config)
    except TypeError:  # older transformers: no config argument
        cache = DynamicCache()
    params = inspect.signature(language_model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), cache


def _attn(mask: Tensor, impl: str, dtype: torch.dtype) -> Tensor:
    if impl != "eager":
        return mask
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return add.masked_fill_(~mask, torch.finfo(dtype).min)


class KeepMaskPredictor:
    """Greedy keyphrase generation from keep-masked prompts (compact rows, positions kept).

    Args:
        loaded: :class:`aimkp.models.LoadedModel`.
        max_new_tokens: generation budget per record; batch_size: prompts per batch.
    """

    def __init__(self, loaded: Any, max_new_tokens: int = 32, batch_size: int = 8) -> None:
        if loaded.adapter.attn_implementation.startswith("flash"):
            raise UsageError("hidden-modality decoding needs attn 'sdpa' or 'eager'")
        self.loaded = loaded
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def predict(self, records: Sequence[Any], kind: str | None) -> list[list[str]]:
        """Ranked keyphrases per record with ``kind`` ("text", "image", None) hidden."""
        if kind is not None and kind not in HIDDEN_KINDS:
            raise ValueError(f"hidden modality must be one of {HIDDEN_KINDS}, got {kind!r}")
        model = self.loaded.adapter.base
        was_training = model.training
        model.eval()
        out: list[list[str]] = []
        try:
            with torch.no_grad():
                for i in range(0, len(records), self.batch_size):
                    out += self._batch(records[i : i + self.batch_size], kind)
        finally:
            model.train(was_training)
        return out

    def _prompt(self, samples: list[Any], kind: str | None) -> tuple[Tensor, Any, Tensor]:
        """Compact prompt rows: embeds ``[R, K_max, D]``, the collated batch, kept counts [R]."""
        from aimkp.models.forward import collate_rows
        from aimkp.ops import CompactEmbedding, masked_embedding

        adapter = self.loaded.adapter
        weight = adapter.embed_tokens.weight
        keeps = [hidden_keep(s, kind) for s in samples]
        batch = collate_rows(
            self.loaded,
            samples,
            keeps,
            list(range(len(samples))),
            "compact",
            weight.device,
            layout="padded",
        )
        feats = [f for f in adapter.sample_image_features(samples) if f is not None]
        ce = masked_embedding(
            batch.input_ids,
            weight,
            keep=batch.keep,
            image_features=torch.cat(feats).to(weight.dtype) if feats else None,
            image_token_id=adapter.image_token_id,
            compact=True,
        )
        assert isinstance(ce, CompactEmbedding)  # compact=True
        assert batch.scatter_index is not None  # compact + padded rows have a scatter index
        R, km = batch.num_rows, batch.max_seqlen
        flat = ce.values.new_zeros(R * km, ce.values.shape[-1])
        embeds = flat.index_copy(0, batch.scatter_index, ce.values).view(R, km, -1)
        return embeds, batch, batch.keep.sum(1)

    def _batch(self, records: Sequence[Any], kind: str | None) -> list[list[str]]:
        adapter, tok = self.loaded.adapter, self.loaded.tokenizer
        lm, impl = adapter.language_model, adapter.attn_implementation
        samples = [adapter.encode(r, with_answer=False) for r in records]
        embeds, batch, counts = self._prompt(samples, kind)
        R, km = embeds.shape[0], embeds.shape[1]
        dev = embeds.device
        key_ok = torch.arange(km, device=dev)[None, :] < counts[:, None]  # [R, km] prompt keys
        # next position of each row: after its UNMASKED prompt (hidden tokens keep theirs)
        pos_next = torch.stack([s.position_ids.max() + 1 for s in samples]).to(dev)
        n_pos = 1 if samples[0].position_ids.ndim == 1 else int(samples[0].position_ids.shape[0])
        cache_kw, cache = _new_cache(lm)
        mask = _attn(batch.attn_mask, impl, embeds.dtype)
        o = lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=batch.position_ids,
            use_cache=True,
            **{cache_kw: cache},
        )
        h = o.last_hidden_state[torch.arange(R, device=dev), counts - 1]  # [R, D]
        eos, pad = tok.eos_token_id, adapter.pad_token_id
        done = torch.zeros(R, dtype=torch.bool, device=dev)
        gen: list[Tensor] = []
        for step in range(self.max_new_tokens):
            nxt = adapter.lm_head(h).float().argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            gen.append(nxt)
            done |= nxt == eos
            if bool(done.all()) or step + 1 == self.max_new_tokens:
                break
            keys = torch.cat([key_ok, torch.ones(R, step + 1, dtype=torch.bool, device=dev)], 1)
            pos = (pos_next + step).reshape(1, R, 1).expand(n_pos, R, 1)
            o = lm(
                inputs_embeds=adapter.embed_tokens.weight[nxt][:, None, :],
                attention_mask=_attn(keys[:, None, None, :], impl, embeds.dtype),
                position_ids=pos[0] if n_pos == 1 else pos,
                use_cache=True,
                **{cache_kw: cache},
            )
            h = o.last_hidden_state[:, -1]
        texts = tok.batch_decode(torch.stack(gen, 1).cpu(), skip_special_tokens=True)
        return [parse_keyphrases(t) for t in texts]


def predict_fn_for(predictor: Any) -> Callable[[list[Any]], list[list[str]]]:
    """A ``run_robustness`` predict function: records whose ``meta["hidden_modality"]`` names a
    modality go through :class:`KeepMaskPredictor`, the others through ``predictor.predict``."""
    hidden: KeepMaskPredictor | None = None

    def fn(records: list[Any]) -> list[list[str]]:
        nonlocal hidden
        kinds = [(r.meta or {}).get("hidden_modality") for r in records]
        if not any(kinds):
            return predictor.predict(records)
        if getattr(predictor, "decoding", "greedy") != "greedy":
            raise UsageError("the hidden-modality settings decode greedily only (--decoding)")
        if hidden is None:
            hidden = KeepMaskPredictor(
                predictor.loaded, predictor.options.max_new_tokens, predictor.options.batch_size
            )
        out: list[list[str] | None] = [None] * len(records)
        for kind in dict.fromkeys(kinds):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            sub = [records[i] for i in idx]
            preds = hidden.predict(sub, kind) if kind else predictor.predict(sub)
            for i, p in zip(idx, preds):
                out[i] = p
        return [p if p is not None else [] for p in out]

    return fn
