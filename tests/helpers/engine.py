"""Toy models and checks shared by the engine tests: LoRA / MLP stacks, per-row losses, and the
engine run against the per-row loop reference (fp32, relative error <= 1e-4)."""

from __future__ import annotations

import torch
from torch import nn

import aimkp
from aimkp.engine.reference import gram_from_grads, loop_per_row_grads

RTOL = 1e-4


def assert_close_rel(x: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    """max |x - ref| <= rtol * max(|ref|) (relative to the scale of the reference vector)."""
    x, ref = x.double().cpu(), ref.double().cpu()
    assert x.shape == ref.shape
    assert torch.isfinite(x).all()
    err = (x - ref).abs().max().item() if x.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert err <= rtol * max(scale, 1e-12), f"max abs err {err:.3e} vs scale {scale:.3e}"


def flat_grads(model: nn.Module) -> torch.Tensor:
    ps = [p for p in model.parameters() if p.requires_grad]
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).float().reshape(-1) for p in ps]
    )


class MLP(nn.Module):
    def __init__(self, d: int = 12, h: int = 20, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(d, h, bias=bias)
        self.down = nn.Linear(h, d, bias=not bias)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.down(torch.tanh(self.up(x))))


def lora_mlp(r: int = 4, dropout: float = 0.0, d: int = 12) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    m = MLP(d=d)
    for p in m.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["up", "down"])
    m = inject_adapter_in_model(cfg, m)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_B" in n:  # peft initialises B to zero; random B makes lora_A's gradient nonzero
            nn.init.normal_(p, std=0.3)
    return m


def row_loss_padded(out: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, C] -> [B]: a per-token loss summed over each row's (unmasked) tokens."""
    tok = (out.square() + out).sum(-1)
    if mask is not None:
        tok = tok * mask
    return tok.sum(-1)


def run_engine(model, fwd, pairs=None, **kw):
    with aimkp.per_sample_grad_gram(model, pairs=pairs, **kw) as gram:
        loss = fwd()
        loss.sum().backward()
    return gram, loss


def check_against_loop(model, fwd, pairs, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # same dropout masks in both forwards
    gram, _ = run_engine(model, fwd, pairs, **kw)
    engine_grad = flat_grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    loss = fwd()
    G = loop_per_row_grads(model, loss)
    norms, dots, cos = gram_from_grads(G, pairs)
    assert_close_rel(gram.norms, norms)
    if pairs is not None:
        assert_close_rel(gram.dots, dots)
        assert_close_rel(gram.cosines, cos)
    # .grad after the engine's backward equals the plain backward's (sum of per-row grads)
    assert_close_rel(engine_grad, G.sum(0), rtol=1e-5)
    return gram, G


PAIRS = torch.tensor([[0, 1], [0, 2], [3, 1], [2, 2]])
