"""hypothesis fuzz of the per-sample gradient engine against the per-row loop reference.

Random backends (torch, Triton interpreted), forms, batch sizes, row lengths (padded with a mask),
widths, dtypes (float32 / float64), pairs, layer mixes (Embedding, LayerNorm, Linear with or
without bias) and, sometimes, a non-finite row (its loss scaled by NaN or inf). Finite rows:
norms, dots and cosines match the reference with relative error 1e-4 of the vector's scale (fp32
accumulation in another order). A non-finite row: its norm and every number of a pair involving
it are NaN, and ``reweight`` with 0 for it leaves ``.grad`` finite and equal to the other rows'
summed gradient (relative 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import aimkp
from aimkp.engine.reference import gram_from_grads, loop_per_row_grads


def _close(x: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all()
    err = (x - ref).abs().max().item() if x.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert err <= rtol * max(scale, 1e-9), (err, scale)


class Model(nn.Module):
    def __init__(self, v: int, d: int, h: int, bias: bool, norm: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.norm = nn.LayerNorm(d) if norm else nn.Identity()
        self.up = nn.Linear(d, h, bias=bias)
        self.head = nn.Linear(h, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.up(self.norm(self.emb(ids)))))


@st.composite
def cases(draw) -> dict:
    b = draw(st.integers(1, 5))
    return dict(
        b=b,
        t=draw(st.integers(1, 7)),
        v=draw(st.integers(2, 9)),
        d=draw(st.integers(1, 6)),
        h=draw(st.integers(1, 6)),
        bias=draw(st.booleans()),
        norm=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        pairs=draw(st.lists(st.tuples(st.integers(0, b - 1), st.integers(0, b - 1)), max_size=4)),
        bad=draw(st.one_of(st.none(), st.integers(0, b - 1))),
        poison=draw(st.sampled_from([float("nan"), float("inf")])),
        seed=draw(st.integers(0, 2**16)),
        backend=draw(st.sampled_from(["torch", "torch", "triton"])),  # triton: interpreted
        form=draw(st.sampled_from(["auto", "direct", "ghost"])),
    )


# the Triton interpreter's numpy matmul warns on the NaN row; the NaN is what is tested
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(c=cases())
def test_engine_matches_loop_reference(c: dict) -> None:
    torch.manual_seed(c["seed"])
    m = Model(c["v"], c["d"], c["h"], c["bias"], c["norm"]).to(c["dtype"])
    ids = torch.randint(0, c["v"], (c["b"], c["t"]))
    lens = torch.randint(1, c["t"] + 1, (c["b"],))
    mask = (torch.arange(c["t"])[None, :] < lens[:, None]).to(c["dtype"])
    poison = torch.ones(c["b"], dtype=c["dtype"])
    if c["bad"] is not None:
        poison[c["bad"]] = c["poison"]
    pairs = torch.tensor(c["pairs"], dtype=torch.long).reshape(-1, 2)

    def loss(scale: torch.Tensor) -> torch.Tensor:
        out = m(ids)
        return ((out.square() + out).sum(-1) * mask).sum(-1) * scale

    with aimkp.per_sample_grad_gram(
        m, pairs=pairs, keep_for_reweight=True, backend=c["backend"], form=c["form"]
    ) as gram:
        loss(poison).sum().backward()
    ok = torch.ones(c["b"], dtype=torch.bool)
    if c["bad"] is not None:
        ok[c["bad"]] = False
    assert torch.equal(gram.finite_rows(), ok)
    assert torch.isnan(gram.norms[~ok]).all()
    pair_ok = ok[pairs[:, 0]] & ok[pairs[:, 1]]
    assert torch.isnan(gram.cosines[~pair_ok]).all() and torch.isnan(gram.dots[~pair_ok]).all()

    grads_after = [p.grad.clone() for p in m.parameters()]
    gram.reweight(ok.float())
    reweighted = torch.cat([p.grad.double().reshape(-1) for p in m.parameters()])
    for p, g in zip(m.parameters(), grads_after):
        p.grad = g
    G = loop_per_row_grads(m, loss(torch.ones(c["b"], dtype=c["dtype"])))
    norms, dots, cos = gram_from_grads(G, pairs)
    _close(gram.norms[ok], norms[ok])
    _close(gram.dots[pair_ok], dots[pair_ok])
    _close(gram.cosines[pair_ok], cos[pair_ok])
    _close(reweighted, G[ok].double().sum(0))
