"""Per-sample gradient engine: the rule of the fused masked embedding (``MaskedEmbedding``).

A trainable table read through the fused op (padded rows and ``compact=True`` packed rows, with
image features, hidden positions, padding and repeated ids): per-row norms, pair dots, the summed
gradient and ``reweight`` against a per-row backward loop.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aimkp
from aimkp.engine.reference import gram_from_grads, loop_per_row_grads
from aimkp.ops import MaskedEmbedding
from tests.helpers.engine import assert_close_rel, flat_grads

V, D, IMG, PAD = 13, 6, 11, 0
PAIRS = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 0]])


class TinyLM(nn.Module):
    """MaskedEmbedding (trainable) + projector for image features -> Linear -> head."""

    def __init__(self) -> None:
        super().__init__()
        emb = nn.Embedding(V, D, padding_idx=PAD)
        self.emb = MaskedEmbedding.from_embedding(emb, image_token_id=IMG, backend="reference")
        self.proj = nn.Linear(4, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def embed(self, ids, keep, feats, compact):  # noqa: ANN001, ANN201
        return self.emb(ids, keep=keep, image_features=self.proj(feats), compact=compact)

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(h)))


def _batch(seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 9
    ids = torch.randint(1, IMG, (B, T), generator=g)
    ids[:, 1:3] = IMG  # two image tokens per row
    ids[0, 5] = ids[0, 6] = ids[1, 5] = 7  # repeated ids, shared across rows
    ids[2, 7:] = PAD  # padding: no gradient to the table
    ids[3, 4] = V - 1  # the last row of the table
    keep = torch.rand(B, T, generator=g) > 0.3
    keep[:, 0] = True
    keep[2, 1:3] = False  # a row whose image is hidden
    feats = torch.randn(int((ids == IMG).sum()), 4, generator=g)
    return ids, keep, feats


def _cu(counts: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(counts, 0)
    return cu


def _per_row_loss(out: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    tok = (out.square() + out).sum(-1).reshape(-1)
    return torch.zeros(B).index_add(0, rows, tok)


@pytest.mark.parametrize("compact", [False, True])
def test_masked_embedding_rule_vs_loop(compact: bool) -> None:
    torch.manual_seed(0)
    m = TinyLM()
    ids, keep, feats = _batch()
    B, T = ids.shape
    counts = keep.sum(1)
    cu = _cu(counts)

    def fwd() -> torch.Tensor:
        e = m.embed(ids, keep, feats, compact)
        if compact:
            rows = torch.repeat_interleave(torch.arange(B), counts)
            return _per_row_loss(m.tail(e.values), rows, B)
        rows = torch.arange(B).repeat_interleave(T)
        mask = keep.reshape(-1, 1).float()
        return _per_row_loss(m.tail(e).reshape(B * T, -1) * mask, rows, B)

    kw = {"cu_seqlens": cu} if compact else {}
    img_rows = {"proj": _cu((ids == IMG).sum(1))}  # the projector sees each row's image tokens
    m.zero_grad(set_to_none=True)
    with aimkp.per_sample_grad_gram(m, pairs=PAIRS, module_rows=img_rows, **kw) as gram:
        fwd().sum().backward()
    engine_grad = flat_grads(m)
    assert gram.layers["emb"].startswith("torch")
    m.zero_grad(set_to_none=True)
    G = loop_per_row_grads(m, fwd())
    norms, dots, cos = gram_from_grads(G, PAIRS)
    assert_close_rel(gram.norms, norms)
    assert_close_rel(gram.dots, dots)
    assert_close_rel(gram.cosines, cos)
    assert_close_rel(engine_grad, G.sum(0), rtol=1e-5)


@pytest.mark.parametrize("compact", [False, True])
def test_masked_embedding_rule_reweight(compact: bool) -> None:
    torch.manual_seed(1)
    m = TinyLM()
    ids, keep, feats = _batch(1)
    B = ids.shape[0]
    counts = keep.sum(1)
    cu = _cu(counts)
    scale = torch.tensor([1.0, 0.0, 2.5, 0.5])

    def fwd() -> torch.Tensor:
        e = m.embed(ids, keep, feats, compact)
        if compact:
            rows = torch.repeat_interleave(torch.arange(B), counts)
            return _per_row_loss(m.tail(e.values), rows, B)
        rows = torch.arange(B).repeat_interleave(ids.shape[1])
        return _per_row_loss(m.tail(e).reshape(-1, 3), rows, B)

    # compact rows given per module (how the training step passes them in a padded layout)
    rows_of = {"proj": _cu((ids == IMG).sum(1))}
    if compact:
        rows_of.update({"emb": cu, "mix": cu, "head": cu})
    kw = {"module_rows": rows_of, "num_rows": B}
    m.zero_grad(set_to_none=True)
    with aimkp.per_sample_grad_gram(m, keep_for_reweight=True, **kw) as gram:
        fwd().sum().backward()
    gram.reweight(scale)
    got = flat_grads(m)
    m.zero_grad(set_to_none=True)
    G = loop_per_row_grads(m, fwd())
    assert_close_rel(got, (scale[:, None] * G).sum(0), rtol=1e-5)


def test_masked_embedding_rule_refuses_trainable_fill() -> None:
    m = MaskedEmbedding(V, D, image_token_id=IMG, learnable_fill=True, backend="reference")
    ids = torch.randint(1, IMG, (2, 5))
    with pytest.raises(ValueError, match="fill"):
        with aimkp.per_sample_grad_gram(m) as _:
            m(ids, keep=torch.ones_like(ids, dtype=torch.bool)).sum().backward()
