"""Per-sample gradient engine on tied weights (one parameter owned by several modules): an LM head
sharing the input embedding's table (ids x dense factors), two linear layers sharing a weight
(dense x dense), the fused MaskedEmbedding tied to a head, and a tiny Hugging Face model with
``tie_word_embeddings=True``; against a loop of one backward per row (fp32, relative error
<= 1e-4, as in tests/helpers/engine.py), with ``reweight`` and the docstring example."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aimkp
from aimkp.engine.reference import loop_per_row_grads
from tests.helpers.engine import (
    PAIRS,
    assert_close_rel,
    check_against_loop,
    flat_grads,
    row_loss_padded,
)


class TiedLM(nn.Module):
    """Embedding -> Linear -> GELU -> head, the head's weight the embedding's table."""

    def __init__(self, vocab: int = 13, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.gelu(self.mid(self.emb(ids))))


def _ids(B: int = 4, T: int = 9, vocab: int = 13) -> torch.Tensor:
    torch.manual_seed(0)
    ids = torch.randint(1, vocab, (B, T))
    ids[0, :3] = 5  # repeated ids in a row
    ids[1, :2] = 5  # shared with row 0
    ids[2, 5:] = 0  # padding: no embedding gradient, the head still sees these tokens
    return ids


@pytest.mark.parametrize("form", ["direct", "ghost"])
def test_embedding_tied_to_head_padded(form: str) -> None:
    m = TiedLM()
    ids = _ids()
    gram, _ = check_against_loop(m, lambda: row_loss_padded(m(ids)), PAIRS, form=form)
    assert gram.layers["tied: emb.weight = head.weight"] == "torch/cross"


def test_embedding_tied_to_head_packed_with_empty_row() -> None:
    m = TiedLM()
    ids = torch.randint(1, 13, (1, 15))
    ids[0, 2] = 0
    cu = torch.tensor([0, 4, 4, 11, 15])
    seg = torch.repeat_interleave(torch.arange(4), cu[1:] - cu[:-1])

    def fwd() -> torch.Tensor:
        out = m(ids)[0]
        return torch.zeros(4).index_add(0, seg, (out.square() + out).sum(-1))

    gram, _ = check_against_loop(m, fwd, PAIRS, cu_seqlens=cu)
    assert gram.norms[1] == 0


def test_two_linears_share_a_weight_and_bias_not_shared() -> None:
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight  # dense x dense cross term; the biases stay separate
    m = nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(4, 5, 6)
    check_against_loop(m, lambda: row_loss_padded(m(x)), PAIRS)


def test_module_called_twice_and_tied() -> None:
    m = TiedLM()
    ids = _ids()

    def fwd() -> torch.Tensor:  # the head runs twice; both calls and the embedding are one sum
        h = nn.functional.gelu(m.mid(m.emb(ids)))
        return row_loss_padded(m.head(h) + 0.5 * m.head(h.flip(1)))

    check_against_loop(m, fwd, PAIRS)


def test_reweight_with_tied_weights() -> None:
    m = TiedLM()
    ids = _ids()
    scale = torch.tensor([0.0, 2.0, 1.0, 0.5])
    m.zero_grad(set_to_none=True)
    with aimkp.per_sample_grad_gram(m, pairs=PAIRS, keep_for_reweight=True) as gram:
        row_loss_padded(m(ids)).sum().backward()
    gram.reweight(scale)
    got = flat_grads(m)
    m.zero_grad(set_to_none=True)
    G = loop_per_row_grads(m, row_loss_padded(m(ids)))
    assert_close_rel(got, (scale[:, None] * G).sum(0), rtol=1e-5)


@pytest.mark.parametrize("compact", [False, True])
def test_masked_embedding_tied_to_head(compact: bool) -> None:
    from aimkp.ops import MaskedEmbedding

    torch.manual_seed(1)
    V, D, IMG = 11, 6, 10
    memb = MaskedEmbedding(V, D, image_token_id=IMG, padding_idx=0)
    head = nn.Linear(D, V, bias=False)
    head.weight = memb.weight
    proj = nn.Linear(4, D)
    m = nn.ModuleDict({"memb": memb, "head": head, "proj": proj})
    ids = torch.randint(1, IMG, (3, 8))
    ids[:, 1:3] = IMG  # two image tokens per row
    keep = torch.ones(3, 8, dtype=torch.bool)
    keep[1, 4:6] = False  # masked text tokens
    keep[2, 1:3] = False  # masked image
    feats = torch.randn(3, 2, 4)

    if compact:
        n_keep = keep.sum(1)
        cu = torch.zeros(4, dtype=torch.long)
        cu[1:] = torch.cumsum(n_keep, 0)
        seg = torch.repeat_interleave(torch.arange(3), n_keep)

        def fwd() -> torch.Tensor:
            out = head(memb(ids, keep, proj(feats).reshape(-1, D), compact=True).values)
            return torch.zeros(3).index_add(0, seg, (out.square() + out).sum(-1))

        kw = {"cu_seqlens": cu}  # the projector's [3, 2] tokens are padded rows
    else:

        def fwd() -> torch.Tensor:
            return row_loss_padded(head(memb(ids, keep, proj(feats).reshape(-1, D))))

        kw = {}
    gram, _ = check_against_loop(m, fwd, torch.tensor([[0, 1], [1, 2], [2, 0]]), **kw)
    assert gram.layers["tied: memb.weight = head.weight"] == "torch/cross"


def test_hf_model_with_tied_word_embeddings() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 37, (3, 7))

    def fwd() -> torch.Tensor:
        logits = model(input_ids=ids).logits
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        return -lp.sum(1)

    gram, _ = check_against_loop(model, fwd, torch.tensor([[0, 1], [2, 1]]))
    assert any(k.startswith("tied: ") for k in gram.layers)


def test_tied_docstring_example() -> None:
    """The tiny example of aimkp/engine/tied.py: ||G||^2 = 2 + 10 + 2 * 3 = 18."""
    emb, head = nn.Embedding(3, 2), nn.Linear(2, 3, bias=False)
    head.weight = emb.weight
    m = nn.ModuleDict({"emb": emb, "head": head})
    with aimkp.per_sample_grad_gram(m, num_rows=1) as gram:
        e = emb(torch.tensor([[2]]))
        y = head(torch.tensor([[[0.0, 1.0]]]))
        (
            (e * torch.tensor([1.0, 1.0])).sum() + (y * torch.tensor([1.0, 0.0, 3.0])).sum()
        ).backward()
    assert torch.allclose(gram.sq_norms, torch.tensor([18.0]))


def test_tied_parameter_without_factors_is_an_error() -> None:
    a, b = nn.LayerNorm(4), nn.LayerNorm(4)
    b.weight = a.weight
    with pytest.raises(ValueError, match="tied weights.*LayerNormRule.*factors"):
        aimkp.per_sample_grad_gram(nn.Sequential(a, b))


def test_tied_without_pairs_and_empty_batch() -> None:
    m = TiedLM()
    ids = _ids()
    check_against_loop(m, lambda: row_loss_padded(m(ids)), None)
    pairs = torch.zeros(0, 2, dtype=torch.long)
    with aimkp.per_sample_grad_gram(m, pairs=pairs, num_rows=0) as gram:
        m(torch.zeros(0, 4, dtype=torch.long)).sum().backward()
    assert gram.norms.shape == (0,) and gram.dots.shape == (0,)
