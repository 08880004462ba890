"""Frozen base in a half dtype under LoRA (``--dtype``) and non-reentrant gradient checkpointing
(``--gradient-checkpointing``), with the per-sample gradient engine and the exact reweight."""

from __future__ import annotations

import pytest
import torch

from aimkp.method.options import StepOptions
from aimkp.method.pmm import StrideTable
from aimkp.method.step import aimkp_step
from aimkp.models import precision as P
from tests.helpers.cuda import requires_cuda
from tests.helpers.models import (
    random_keeps,
    records,
    tiny,
)
from tests.helpers.rows import engine_run_rows as _engine_run


def test_resolve_dtype():
    assert P.resolve_dtype("auto", "cpu") == torch.float32
    assert P.resolve_dtype("float32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="needs a CUDA device"):
        P.resolve_dtype("bfloat16", "cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        P.resolve_dtype("int8", "cpu")
    assert P.autocast_dtype(torch.bfloat16, False) is torch.bfloat16
    assert P.autocast_dtype(torch.float32, True) is torch.bfloat16
    assert P.autocast_dtype(torch.float32, False) is None


def test_cast_frozen_base_keeps_trainable_fp32_and_steps():
    """Every frozen float parameter in bf16, every trainable one fp32; an AimKP step under
    (CPU) bf16 autocast gives finite fp32 gradients and fp32 engine cosines."""
    loaded = tiny("tiny-llava")
    n = P.cast_frozen_base(loaded, torch.bfloat16)
    params = list(loaded.model.named_parameters())
    frozen = [p for _, p in params if not p.requires_grad]
    assert n == sum(p.numel() for p in frozen) > 0
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    trainable = [(name, p) for name, p in params if p.requires_grad]
    assert all(p.dtype == torch.float32 for _, p in trainable)
    assert any("lora_" in name for name, _ in trainable)
    assert any("lora_" not in name for name, _ in trainable)  # the projector
    buffers = [b for name, b in loaded.model.named_buffers() if "inv_freq" in name]
    assert buffers and all(b.dtype == torch.float32 for b in buffers)
    samples = [loaded.adapter.encode(r) for r in records()]
    table = StrideTable(len(samples))
    table.text[:] = 2
    table.image[:] = 2
    n_total = float(sum(s.n_answer_tokens for s in samples))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = aimkp_step(loaded, samples, list(range(len(samples))), table, n_total)
    assert res.decision.cosines.dtype == torch.float32
    assert bool(torch.isfinite(res.decision.cosines).all()) and res.decision.cosines.numel()
    for _, p in trainable:
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert bool(torch.isfinite(p.grad).all())


def _train(loaded, samples, steps: int, checkpointing: bool):
    """``steps`` AimKP micro-steps + AdamW; counts forwards of the first decoder layer's attention
    (inside the checkpointed forward: its hooks also see the recompute)."""
    if checkpointing:
        P.enable_gradient_checkpointing(loaded)
    loaded.model.train()
    layer = loaded.adapter.language_model.layers[0].self_attn
    calls = [0]
    h = layer.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    table = StrideTable(len(samples))
    table.text[:] = 2
    table.image[:] = 2
    n_total = float(sum(s.n_answer_tokens for s in samples))
    idx = list(range(len(samples)))
    opts = StepOptions(tau_image=0.9, update_strides=False)
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            # tau_image 0.9 rejects image copies: the reweight path runs
            aimkp_step(loaded, samples, idx, table, n_total, opts)
            opt.step()
    finally:
        h.remove()
    return [p.detach().clone() for p in params], calls[0]


def test_gradient_checkpointing_is_exact_with_engine_and_reweight():
    plain, ckpt = tiny("tiny-llava"), tiny("tiny-llava")
    samples = [plain.adapter.encode(r) for r in records()]
    w_plain, calls_plain = _train(plain, samples, 3, checkpointing=False)
    w_ckpt, calls_ckpt = _train(ckpt, samples, 3, checkpointing=True)
    assert calls_plain == 3 and calls_ckpt == 6, "checkpointing must recompute in the backward"
    for a, b in zip(w_ckpt, w_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the engine's per-row numbers and its reweight see each row's tokens exactly once
    keeps, rows = random_keeps(samples, copies=2, seed=4)
    got = _engine_run(ckpt, samples, keeps, rows, "auto")
    want = _engine_run(plain, samples, keeps, rows, "auto")
    torch.testing.assert_close(got[3], want[3], rtol=1e-6, atol=0)  # gram.norms
    torch.testing.assert_close(got[4], want[4], rtol=0, atol=1e-6)  # cosines
    for name in want[5]:
        torch.testing.assert_close(got[5][name], want[5][name], rtol=1e-5, atol=1e-7)


@requires_cuda
def test_bf16_base_step_on_cuda_close_to_fp32():
    """The LoRA step with a bf16 frozen base under bf16 autocast (what ``--dtype auto`` does on
    CUDA): fp32 trainable weights and gradients, loss and cosines near the fp32 step's."""
    fp32, bf16 = tiny("tiny-llava"), tiny("tiny-llava")
    for m in (fp32, bf16):
        m.model.to("cuda")
    P.cast_frozen_base(bf16, P.resolve_dtype("auto", "cuda"))
    samples = [fp32.adapter.encode(r) for r in records()]
    res = {}
    for name, m, amp in (("fp32", fp32, None), ("bf16", bf16, torch.bfloat16)):
        table = StrideTable(len(samples))
        table.text[:] = 2
        table.image[:] = 2
        n_total = float(sum(s.n_answer_tokens for s in samples))
        idx = list(range(len(samples)))
        opts = StepOptions(device="cuda", amp_dtype=amp)
        res[name] = aimkp_step(m, samples, idx, table, n_total, opts)
    assert all(
        p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())
        for p in bf16.model.parameters()
        if p.requires_grad
    )
    assert abs(res["bf16"].loss - res["fp32"].loss) <= 2e-2 * abs(res["fp32"].loss)
    torch.testing.assert_close(
        res["bf16"].decision.cosines, res["fp32"].decision.cosines, atol=5e-2, rtol=0
    )


def test_cli_half_dtype_on_cpu_is_a_one_line_user_error(capsys):
    from aimkp.cli import main

    rc = main(["train", "--device", "cpu", "--dtype", "bfloat16", "--output", "/nonexistent"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs a CUDA device" in err[0], err
