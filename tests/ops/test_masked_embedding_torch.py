"""masked_embedding as a torch citizen: torch.library opcheck, torch.compile, nn.Module swap-in."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aimkp.ops import (
    MaskedEmbedding,
    last_backend,
    masked_embedding,
    masked_embedding_reference,
    replace_input_embedding,
)
from aimkp.ops.masked_embedding_ref import compaction_index
from tests.helpers.cuda import requires_cuda

V, D, T = 20, 12, 9


def _inputs() -> tuple:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, T), generator=g)
    ids[:, 2:4] = V  # image token (outside the vocabulary)
    ids[1, -1] = -100
    keep = torch.rand(2, T, generator=g) < 0.6
    w = torch.randn(V, D, generator=g, requires_grad=True)
    feats = torch.randn(4, D, generator=g, requires_grad=True)
    fill = torch.randn(D, generator=g, requires_grad=True)
    return ids, keep, w, feats, fill


@pytest.mark.parametrize("backend", ["cpp", "triton", pytest.param("cuda", marks=requires_cuda)])
def test_opcheck(backend: str) -> None:
    """Schema, fake tensor, autograd registration and AOT dispatch (dynamic) of both ops."""
    dev = "cuda" if backend != "cpp" and torch.cuda.is_available() else "cpu"
    ids, keep, w, feats, fill = (
        t.detach().to(dev).requires_grad_(t.requires_grad) for t in _inputs()
    )
    flat = ids.reshape(-1)
    op = torch.ops.aimkp.masked_embedding.default
    torch.library.opcheck(
        op, (flat, keep.reshape(-1), None, w, feats, fill, V, -100, False, backend)
    )
    index, _, _ = compaction_index(ids, keep)
    torch.library.opcheck(op, (flat, None, index, w, feats, fill, V, -100, True, backend))
    grad = torch.randn(flat.numel(), D, device=dev)
    bwd = torch.ops.aimkp.masked_embedding_backward.default
    args = (grad, flat, keep.reshape(-1), None, V, 4, V, -100, True, True, True, False, backend)
    torch.library.opcheck(bwd, args)


def _dense(ids, keep, w, feats, fill):
    return (masked_embedding(ids, w, keep, feats, V, fill, -100) * 2).tanh()


def _compact(ids, keep, w, feats, fill):
    c = masked_embedding(ids, w, keep, feats, V, fill, -100, compact=True)
    return c.values.tanh(), c.positions, c.cu_seqlens


def _check_grads(fn, compiled, args) -> None:
    ids, keep, w, feats, fill = args
    got = compiled(*args)
    ref = fn(*args)
    got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
    for a, b in zip(got[1:], ref[1:]):  # index outputs: exact
        assert torch.equal(a, b)
    # Inductor may fuse tanh / mul differently from eager: a few fp32 ulp.
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-6)
    g1 = torch.autograd.grad(got[0].sum(), (w, feats, fill))
    g2 = torch.autograd.grad(ref[0].sum(), (w, feats, fill))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert last_backend("masked_embedding") == "cpp"


def test_torch_compile_dense_fullgraph_inductor() -> None:
    """The dense path compiles to one graph (fullgraph=True) with forward and backward."""
    torch._dynamo.reset()
    _check_grads(_dense, torch.compile(_dense, fullgraph=True), _inputs())


def test_torch_compile_compact() -> None:
    """Compact: the data-dependent compaction index (nonzero) is computed outside the custom op,
    so by default dynamo breaks the graph there (fullgraph=False) and compiles the rest; with
    ``capture_dynamic_output_shape_ops`` the kept count K is an unbacked symbol and the whole
    function compiles as one graph (fullgraph=True)."""
    torch._dynamo.reset()
    _check_grads(_compact, torch.compile(_compact, backend="aot_eager"), _inputs())
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(_compact, backend="aot_eager", fullgraph=True)
        _check_grads(_compact, compiled, _inputs())


def test_module_matches_functional_and_padding_idx() -> None:
    emb = nn.Embedding(V, D, padding_idx=1)
    m = MaskedEmbedding.from_embedding(emb, image_token_id=V, learnable_fill=True)
    assert m.weight is emb.weight
    ids, keep, _, feats, _ = _inputs()
    ids = ids.clone()
    ids[ids == -100] = 1  # padding id
    ids[0, 0] = 1
    text_ids = torch.where(ids == V, 5, ids)
    assert torch.equal(m(text_ids), emb(text_ids))  # plain lookup: exactly nn.Embedding
    with pytest.raises(ValueError, match="input_ids: id 20"):
        m(ids)  # without features the image token is an ordinary (here out-of-range) id
    # nn.Embedding semantics of padding_idx: that row receives no gradient.
    m(ids, keep=keep, image_features=feats.detach()).sum().backward()
    assert torch.all(emb.weight.grad[1] == 0) and emb.weight.grad.abs().sum() > 0
    assert m.fill.grad is not None
    with pytest.raises(ValueError, match="emb must be an nn.Embedding"):
        MaskedEmbedding.from_embedding(nn.Linear(2, 2))


def test_replace_input_embedding_in_tiny_llama() -> None:
    """A tiny LlamaForCausalLM gives identical logits and gradients after the swap."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    original = copy.deepcopy(model)
    new = replace_input_embedding(model)
    assert isinstance(model.get_input_embeddings(), MaskedEmbedding)
    assert new.weight is model.model.embed_tokens.weight
    assert replace_input_embedding(model) is new  # idempotent
    ids = torch.randint(0, 64, (2, 17))
    out = model(input_ids=ids, use_cache=False).logits
    ref = original(input_ids=ids, use_cache=False).logits
    assert torch.equal(out, ref)
    assert last_backend("masked_embedding") == "cpp"
    out.square().mean().backward()
    ref.square().mean().backward()
    # Identical embedding rows and upstream graph; only the weight-gradient reduction order
    # (C++ segment sum vs PyTorch's embedding backward) differs: fp32 ulps.
    torch.testing.assert_close(
        new.weight.grad, original.get_input_embeddings().weight.grad, atol=1e-7, rtol=1e-5
    )
    # Masked input through inputs_embeds: hidden tokens become the (zero) fill row.
    keep = torch.rand(2, 17) < 0.5
    embeds = new(ids, keep=keep)
    ref_embeds = masked_embedding_reference(ids, new.weight, keep)
    assert torch.equal(embeds, ref_embeds)
    model(inputs_embeds=embeds, use_cache=False)
