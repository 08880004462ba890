"""The row forward: many masked copies of samples in one forward pass, per-row answer losses.

A *row* is one copy of one encoded sample with its keep mask (False = token hidden from
attention; only text and image positions may be hidden). Two execution modes give the same
per-row losses and parameter gradients:

- ``compact`` (default, fast): the fused :func:`aimkp.ops.masked_embedding` drops hidden tokens
  and merges the vision features in one pass; rows are packed into one ``[1, K_total]`` varlen
  sequence; kept tokens keep the position ids of the unmasked sequence (gathered). Sequence
  boundaries are always explicit: a 4-D block-diagonal causal mask (SDPA / eager) or
  ``cu_seq_lens_q/k`` + ``max_length_q/k`` (flash-attn). They are never inferred from
  ``position_ids``: transformers reads every jump in them as a new packed sequence
  (``masking_utils.find_packed_sequence_indices``), and kept tokens' positions jump by design.
  (transformers 5.24 returns a user 4-D mask unchanged: ``_preprocess_mask_arguments`` exits
  early on ``attention_mask.ndim == 4``, before any packed-sequence detection.)
  With SDPA / eager attention the dense block mask costs ``K_total^2``; ``layout="padded"``
  pads the compact rows to ``[R, K_max]`` instead (``R * K_max^2``; rows are then the batch
  dimension and ``cu_seqlens`` is None, as in attention mode).
- ``attention`` (reference formulation): padded ``[R, T]`` full sequences; hidden tokens are
  removed from attention by the 4-D mask (causal AND key kept AND key not padding; a token
  always sees itself so no softmax row is empty); positions unchanged.

Logits are computed only at positions that predict answer tokens (hidden states gathered
first), in fp32, so the ``[tokens, vocab]`` logits tensor of a full LM head is never formed;
with a frozen head (every LoRA run) they are computed in chunks of answer tokens
(:mod:`aimkp.models.lm_loss`), so not even the ``[answer tokens, vocab]`` one is.

>>> batch = collate_rows(loaded, samples, keeps, row_sample, mode="compact", device="cpu")
>>> batch.cu_seqlens, batch.num_rows          # known before the forward
>>> out = forward_rows(loaded, batch)         # RowLosses(loss_sum [R] fp32, n_tokens [R])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from aimkp import spans
from aimkp.models.adapter import EncodedSample
from aimkp.models.lm_loss import row_answer_losses
from aimkp.ops import MaskedEmbedding, last_backend, masked_embedding

if TYPE_CHECKING:
    from aimkp.models import LoadedModel
from aimkp.models.attention import VARLEN_IMPL

MODES = ("compact", "attention")
LAYOUTS = ("packed", "padded", "auto")
# Attention implementations that take packed rows as ``cu_seq_lens_q/k`` + ``max_length_q/k``
# (flash-attn varlen, aimkp's registered varlen attention) instead of a 4-D mask.
VARLEN_ATTENTION = {"flash_attention_2", "flash_attention_3", VARLEN_IMPL}


@dataclass(frozen=True)
class ForwardRecord:
    """What one :func:`forward_rows` call ran (for logs and benchmarks).

    Attributes:
        mode: ``"compact"`` or ``"attention"``.
        layout: ``"packed"`` or ``"padded"``.
        embedding: the embedding op (``"aimkp.ops.masked_embedding"``; a trainable table read
            through the :class:`aimkp.ops.MaskedEmbedding` module calls the same op).
        embedding_backend: the backend the op ran on (``aimkp.ops.last_backend``).
        attention: the language model's attention implementation.
    """

    mode: str
    layout: str
    embedding: str
    embedding_backend: str
    attention: str


@dataclass
class RowLosses:
    """Per-row answer losses: ``loss_sum [R]`` (fp32 sum of token CE), ``n_tokens [R]`` (int64),
    and ``ran``, the record of what the forward ran."""

    loss_sum: Tensor
    n_tokens: Tensor
    ran: ForwardRecord


@dataclass
class RowBatch:
    """Rows collated for :func:`forward_rows` (everything on ``device``).

    Attributes:
        mode: ``"compact"`` or ``"attention"``.
        num_rows: R.
        row_sample: sample index of each row (into ``samples``).
        samples: the encoded samples the rows copy.
        input_ids: LongTensor ``[R, T_max]``, rows padded with the pad id.
        keep: BoolTensor ``[R, T_max]``: kept and not padding.
        valid: BoolTensor ``[R, T_max]``: not padding.
        position_ids: compact ``[1, K]`` / ``[3, 1, K]``; attention ``[R, T]`` / ``[3, R, T]``.
        cu_seqlens: IntTensor ``[R+1]`` row offsets in the packed sequence (compact), else None.
        max_seqlen: longest packed row (compact) or ``T_max`` (attention).
        attn_mask: BoolTensor 4-D (True = may attend): compact ``[1, 1, K, K]`` block-diagonal
            causal, attention ``[R, 1, T, T]``; None on the flash path; ``[1, K]`` all True
            on aimkp's varlen path.
        pred_index: LongTensor ``[A]`` flat index into the hidden states (``[K]`` compact,
            ``[R * T_max]`` attention) of each position that predicts an answer token.
        pred_row: LongTensor ``[A]`` row of each such position.
        targets: LongTensor ``[A]`` the answer token it predicts.
        n_tokens: LongTensor ``[R]`` answer tokens per row.
        n_kept: number of kept tokens (K).
        layout: ``"packed"`` (compact rows in one ``[1, K]`` sequence) or ``"padded"``
            (``[R, T_max]`` full rows in attention mode, ``[R, K_max]`` compact rows).
        scatter_index: compact + padded only: LongTensor ``[K]``, slot of each kept token in
            the flattened ``[R * K_max]`` layout.
        module_rows: the per-sample gradient engine's layout of the trainable modules whose
            tokens are not the language model's rows: module name (in ``loaded.model``) ->
            LongTensor ``[R+1]`` row offsets of its tokens (see :func:`engine_module_rows`).
    """

    mode: str
    num_rows: int
    row_sample: list[int]
    samples: list[EncodedSample]
    input_ids: Tensor
    keep: Tensor
    valid: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor | None
    max_seqlen: int
    attn_mask: Tensor | None
    pred_index: Tensor
    pred_row: Tensor
    targets: Tensor
    n_tokens: Tensor
    n_kept: int
    layout: str = "padded"
    scatter_index: Tensor | None = None
    module_rows: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> RowBatch:
        """This batch with every tensor field on ``device`` (as ``BatchEncoding.to``), copied
        without blocking the host; ``samples`` and ``module_rows`` stay where they are."""
        moved: dict[str, Any] = {
            f.name: value.to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)


def use_masked_embedding_module(loaded: LoadedModel) -> MaskedEmbedding:
    """Make the model's input embedding a :class:`aimkp.ops.MaskedEmbedding` sharing its weight
    (idempotent), so that row forwards read a TRAINABLE table through a module call the
    per-sample gradient engine can hook. Generation is unchanged (ids alone: a plain lookup)."""
    from aimkp.ops import replace_input_embedding

    emb = loaded.adapter.embed_tokens
    if isinstance(emb, MaskedEmbedding):
        return emb
    return replace_input_embedding(
        loaded.adapter.base, image_token_id=loaded.adapter.image_token_id
    )


def flash_varlen_kwargs(cu_seqlens: Tensor) -> dict[str, Any]:
    """flash-attn varlen arguments for rows packed at ``cu_seqlens`` (IntTensor ``[R+1]``).

    Returns ``cu_seq_lens_q/k`` (int32, same device) and ``max_length_q/k`` (Python ints), the
    keyword arguments transformers' flash-attention integration forwards to
    ``flash_attn_varlen_func`` (self-attention: q and k boundaries are the same).
    """
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries, got {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.to(torch.int32)
    lens = cu[1:] - cu[:-1]
    if bool((lens < 0).any()) or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
    m = int(lens.max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}


def _check_inputs(
    samples: Sequence[EncodedSample],
    keeps: Sequence[Tensor],
    row_sample: Sequence[int],
    mode: str,
) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(keeps) != len(row_sample):
        raise ValueError(f"{len(keeps)} keep masks but {len(row_sample)} row_sample entries")
    if not row_sample:
        raise ValueError("collate_rows needs at least one row")
    for r, (k, si) in enumerate(zip(keeps, row_sample)):
        if not 0 <= si < len(samples):
            raise ValueError(f"row {r}: sample index {si} out of range [0, {len(samples)})")
        s = samples[si]
        if k.dtype != torch.bool or k.shape != s.input_ids.shape:
            raise ValueError(
                f"row {r}: keep must be a BoolTensor of shape {tuple(s.input_ids.shape)}, "
                f"got {k.dtype} {tuple(k.shape)}"
            )
        hidden = ~k.cpu()
        allowed = torch.zeros_like(hidden)
        for span in (s.text_span, s.image_span):
            if span is not None:
                allowed[span[0] : span[1]] = True
        if bool((hidden & ~allowed).any()):
            bad = torch.nonzero(hidden & ~allowed).reshape(-1)[:5].tolist()
            raise ValueError(
                f"row {r}: only text / image positions may be hidden; hidden at {bad} "
                f"(text span {s.text_span}, image span {s.image_span})"
            )
        ans = torch.nonzero(s.labels != -100).reshape(-1)
        if ans.numel() and int(ans[0]) == 0:
            raise ValueError(f"row {r}: the first token cannot be an answer token")


def collate_rows(
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    keeps: Sequence[Tensor],
    row_sample: Sequence[int],
    mode: str = "compact",
    device: torch.device | str | None = None,
    layout: str = "packed",
) -> RowBatch:
    """Collate R rows (copy ``r`` = sample ``row_sample[r]`` with ``keeps[r]`` ``[T_i]``).

    Everything the per-sample gradient engine needs before the forward is here:
    ``batch.num_rows`` and, for packed compact rows, ``batch.cu_seqlens`` (IntTensor ``[R+1]``;
    None when rows are the batch dimension).

    ``layout`` (compact mode): ``"packed"`` (default, the varlen contract: one ``[1, K]``
    sequence, block-diagonal mask or flash-attn ``cu_seq_lens``), ``"padded"`` (compact rows
    padded to ``[R, K_max]``: SDPA / eager attention then costs ``R * K_max^2`` instead of the
    dense block mask's ``K^2``) or ``"auto"`` (packed with flash-attn, else padded).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_inputs(samples, keeps, row_sample, mode)
    module_rows = engine_module_rows(
        loaded, samples, row_sample, keeps if mode == "compact" else None
    )
    if device is None:
        device = loaded.adapter.embed_tokens.weight.device
    device = torch.device(device)
    adapter = loaded.adapter
    R = len(row_sample)
    lens = [samples[si].length for si in row_sample]
    T = max(lens)
    ids = torch.full((R, T), adapter.pad_token_id, dtype=torch.long)
    labels = torch.full((R, T), -100, dtype=torch.long)
    keep = torch.zeros((R, T), dtype=torch.bool)
    valid = torch.zeros((R, T), dtype=torch.bool)
    pos0 = samples[row_sample[0]].position_ids
    n_pos = 1 if pos0.ndim == 1 else int(pos0.shape[0])
    pos = torch.zeros((n_pos, R, T), dtype=torch.long)
    for r, si in enumerate(row_sample):
        s = samples[si]
        n = lens[r]
        ids[r, :n] = s.input_ids
        labels[r, :n] = s.labels
        keep[r, :n] = keeps[r].cpu()
        valid[r, :n] = True
        pos[:, r, :n] = s.position_ids.reshape(n_pos, n)

    # positions predicting answer tokens: t-1 for every answer position t (both must be kept)
    ans_r, ans_t = torch.nonzero(labels != -100, as_tuple=True)
    if not bool(keep[ans_r, ans_t].all()) or not bool(keep[ans_r, ans_t - 1].all()):
        raise ValueError("answer tokens and the token before each of them must be kept")
    targets = labels[ans_r, ans_t]
    n_tokens = torch.bincount(ans_r, minlength=R).long()

    if mode == "compact":
        flat_keep = keep.reshape(-1)
        cmap = torch.cumsum(flat_keep.long(), 0) - 1  # flat position -> packed index
        pred_index = cmap[ans_r * T + ans_t - 1]
        counts = keep.sum(1, dtype=torch.int32)
        cu = torch.zeros(R + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(counts, 0, dtype=torch.int32)
        K = int(cu[-1])
        flat_idx = torch.nonzero(flat_keep).reshape(-1)
        kept_pos = pos.reshape(n_pos, R * T)[:, flat_idx]  # original positions of kept tokens
        position_ids = kept_pos.reshape(n_pos, 1, K)
        position_ids = position_ids[0] if n_pos == 1 else position_ids
        max_seqlen = int(counts.max())
        n_kept = K
        scatter_index = None
        if layout == "auto":
            layout = "packed" if adapter.attn_implementation in VARLEN_ATTENTION else "padded"
        if layout == "packed":
            attn_mask = None
            if adapter.attn_implementation == VARLEN_IMPL:
                # an all-kept 2-D mask: transformers then infers no packed sequences from the
                # jumping position ids, and SDPA's mask builder returns None
                attn_mask = torch.ones(1, K, dtype=torch.bool)
            elif adapter.attn_implementation not in VARLEN_ATTENTION:
                # built on the device: the dense mask is K x K
                seg = torch.repeat_interleave(torch.arange(R), counts.long()).to(device)
                causal = torch.ones(K, K, dtype=torch.bool, device=device).tril_()
                attn_mask = (causal & (seg[:, None] == seg[None, :])).reshape(1, 1, K, K)
            cu_seqlens: Tensor | None = cu
        else:
            if adapter.attn_implementation in VARLEN_ATTENTION:
                raise ValueError("flash-attn (varlen) takes compact rows packed: layout='packed'")
            # compact rows padded to [R, K_max]: attention costs sum_r K_max^2, not K^2
            km = max_seqlen
            row_of = torch.repeat_interleave(torch.arange(R), counts.long())
            slot = row_of * km + (torch.arange(K) - cu[:-1].long()[row_of])
            scatter_index = slot
            pred_index = slot[pred_index]
            padded_pos = torch.zeros(n_pos, R * km, dtype=torch.long)
            padded_pos[:, slot] = kept_pos
            position_ids = padded_pos.reshape(n_pos, R, km)
            position_ids = position_ids[0] if n_pos == 1 else position_ids
            valid_k = torch.zeros(R * km, dtype=torch.bool)
            valid_k[slot] = True
            valid_k = valid_k.to(device)
            causal = torch.ones(km, km, dtype=torch.bool, device=device).tril_()
            eye = torch.eye(km, dtype=torch.bool, device=device)
            attn_mask = ((causal[None] & valid_k.reshape(R, 1, km)) | eye[None]).reshape(
                R, 1, km, km
            )
            cu_seqlens = None  # rows are the batch dimension, as in attention mode
    else:
        if adapter.attn_implementation in VARLEN_ATTENTION:
            raise ValueError(
                "mode='attention' needs an explicit 4-D mask (attn='sdpa' or 'eager'); "
                "flash-attn supports the compact mode only"
            )
        pred_index = ans_r * T + ans_t - 1
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril_()
        eye = torch.eye(T, dtype=torch.bool, device=device)
        key_ok = keep.to(device)[:, None, :]
        attn_mask = ((causal[None] & key_ok) | eye[None]).reshape(R, 1, T, T)
        position_ids = pos[0] if n_pos == 1 else pos
        cu_seqlens = None
        max_seqlen = T
        n_kept = int(keep.sum())
        scatter_index = None
        layout = "padded"

    return RowBatch(
        mode=mode,
        num_rows=R,
        row_sample=list(row_sample),
        samples=list(samples),
        input_ids=ids,
        keep=keep,
        valid=valid,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        attn_mask=attn_mask,
        pred_index=pred_index,
        pred_row=ans_r,
        targets=targets,
        n_tokens=n_tokens,
        n_kept=n_kept,
        layout=layout,
        scatter_index=scatter_index,
        module_rows=module_rows,
    ).to(device)


def _offsets(counts: Sequence[int]) -> Tensor:
    """LongTensor ``[len(counts) + 1]``: 0, then the running sums of ``counts``."""
    cu = torch.zeros(len(counts) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(list(counts), dtype=torch.int64), 0)
    return cu


def engine_module_rows(
    loaded: LoadedModel,
    samples: Sequence[EncodedSample],
    row_sample: Sequence[int],
    keeps: Sequence[Tensor] | None = None,
) -> dict[str, Tensor]:
    """``module_rows`` for the per-sample gradient engine: name -> LongTensor ``[R+1]`` row
    offsets, for each trainable module whose tokens are not laid out as the language model's
    packed / padded rows (row ``r`` copies sample ``row_sample[r]``):

    - every projector submodule the adapter declares (:meth:`MLLMAdapter.projector_rows`) sees
      ``multiplier * h * w`` tokens of each row that has an image, in row order;
    - ``lm_head`` (trainable with full fine-tuning) sees only the positions that predict answer
      tokens, row by row (``n_answer_tokens`` each);
    - a trainable input embedding read with ``compact=True`` (``keeps`` given: the rows' keep
      masks) outputs the kept tokens of every row, packed (``keep.sum()`` each).

    Only modules with trainable parameters of their own are listed.
    """
    adapter = loaded.adapter
    names = {id(m): n for n, m in loaded.model.named_modules()}
    img = []
    for si in row_sample:
        s = samples[si]
        img.append(0 if s.grid is None or s.pixel_values is None else s.grid[0] * s.grid[1])
    out: dict[str, Tensor] = {}
    for module, multiplier in adapter.projector_rows():
        name = names.get(id(module))
        if name is not None and any(p.requires_grad for p in module.parameters(recurse=False)):
            out[name] = _offsets([n * multiplier for n in img])
    head = adapter.lm_head
    head_name = names.get(id(head))
    if head_name is not None and any(p.requires_grad for p in head.parameters()):
        out[head_name] = _offsets([int(samples[si].n_answer_tokens) for si in row_sample])
    emb = adapter.embed_tokens
    emb_name = names.get(id(emb))
    if keeps is not None and emb_name is not None and emb.weight.requires_grad:
        out[emb_name] = _offsets([int(k.sum()) for k in keeps])
    return out


# images per call of a frozen vision tower: its transient activations (attention, MLP) are those
# of this many images, however many the step holds
TOWER_CHUNK_IMAGES = 4


def _frozen_tower_hidden(
    loaded: LoadedModel, samples: Sequence[EncodedSample]
) -> list[Tensor | None]:
    """:meth:`sample_vision_hidden` of ``samples``; a tower with no trainable parameter runs
    under ``no_grad`` (nothing of it is differentiated: the projector's gradient needs only its
    output) in calls of :data:`TOWER_CHUNK_IMAGES` images."""
    adapter = loaded.adapter
    try:
        tower = adapter.vision_tower
    except NotImplementedError:
        tower = None
    # Qwen2-VL's tower holds its projector (the merger), which runs later, with gradients
    projector = {id(p) for p in adapter.projector.parameters()}
    if tower is None or any(p.requires_grad and id(p) not in projector for p in tower.parameters()):
        return adapter.sample_vision_hidden(samples)
    out: list[Tensor | None] = [None] * len(samples)
    with_img = [i for i, s in enumerate(samples) if s.pixel_values is not None]
    with torch.no_grad():
        for c in range(0, len(with_img), TOWER_CHUNK_IMAGES):
            part = with_img[c : c + TOWER_CHUNK_IMAGES]
            for i, h in zip(part, adapter.sample_vision_hidden([samples[i] for i in part])):
                out[i] = h
    return out


def _row_image_features(loaded: LoadedModel, batch: RowBatch) -> Tensor | None:
    """Vision features for every row, in row order: ``[sum over rows with an image of h*w, D]``.

    The vision tower (frozen in AimKP) runs once per distinct sample; the trainable projector
    runs once per ROW on that row's copy of the tower output, so its activations (and a
    per-row gradient engine's view of them) belong to one row each, exactly as if every copy
    had gone through the model's forward on its own.
    """
    used = sorted(set(batch.row_sample))
    hidden = _frozen_tower_hidden(loaded, [batch.samples[i] for i in used])
    by_sample = dict(zip(used, hidden))
    rows = [h for si in batch.row_sample if (h := by_sample[si]) is not None]
    if not rows:
        return None
    return loaded.adapter.project(torch.cat(rows, dim=0))


def _mask_for(attn_mask: Tensor | None, impl: str, dtype: torch.dtype) -> Tensor | None:
    if attn_mask is None or impl != "eager":
        return attn_mask
    # eager attention adds the mask to the scores: 0 where allowed, dtype min where not
    add = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
    return add.masked_fill_(~attn_mask, torch.finfo(dtype).min)


def forward_rows(loaded: LoadedModel, batch: RowBatch) -> RowLosses:
    """Run the collated rows through the language model; per-row answer-token CE sums.

    Returns :class:`RowLosses` (``loss_sum [R]`` fp32 with autograd, ``n_tokens [R]``, ``ran``:
    the embedding op and attention path that ran).
    """
    adapter = loaded.adapter
    emb = adapter.embed_tokens
    weight = emb.weight
    feats = _row_image_features(loaded, batch)
    if feats is not None:
        feats = feats.to(weight.dtype)
    op: Any = masked_embedding
    op_name = "aimkp.ops.masked_embedding"
    if isinstance(emb, MaskedEmbedding):
        # A trainable table is read through the module so that the per-sample gradient engine
        # (a forward hook on it) sees each row's tokens; the module calls the same fused op.
        def op(ids: Tensor, _w: Tensor, **kw: Any) -> Any:  # noqa: ANN401
            kw.pop("image_token_id", None)  # the module's own image_token_id applies
            return emb(ids, **kw)

    impl = adapter.attn_implementation
    kwargs: dict[str, Any] = {}
    compact = batch.mode == "compact"
    with spans.span("embedding_masking"):  # compact: CompactEmbedding; else [R, T, D]
        out_emb = op(
            batch.input_ids,
            weight,
            keep=batch.keep,
            image_features=feats,
            image_token_id=adapter.image_token_id,
            compact=compact,
        )
    if not compact:
        embeds = out_emb
    elif batch.layout == "packed":
        embeds = out_emb.values.unsqueeze(0)  # [1, K, D]
    else:  # [R, K_max, D], padding slots zero (masked out as keys)
        R, km = batch.num_rows, batch.max_seqlen
        flat = out_emb.values.new_zeros(R * km, out_emb.values.shape[-1])
        embeds = flat.index_copy(0, batch.scatter_index, out_emb.values).view(R, km, -1)
    if compact and impl in VARLEN_ATTENTION:
        assert batch.cu_seqlens is not None  # collate_rows packs compact rows for varlen
        kwargs.update(flash_varlen_kwargs(batch.cu_seqlens))
    mask = _mask_for(batch.attn_mask, impl, embeds.dtype)
    out = adapter.language_model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **kwargs,
    )
    hidden = out.last_hidden_state.reshape(-1, embeds.shape[-1])
    h = hidden.index_select(0, batch.pred_index)
    # a frozen head in answer-token chunks (no [A, vocab] fp32 tensor whole), else the module
    loss_sum = row_answer_losses(adapter.lm_head, h, batch.targets, batch.pred_row, batch.num_rows)
    ran = ForwardRecord(
        mode=batch.mode,
        layout=batch.layout,
        embedding=op_name,
        embedding_backend=str(last_backend("masked_embedding")),
        attention=impl,
    )
    return RowLosses(loss_sum=loss_sum, n_tokens=batch.n_tokens, ran=ran)
