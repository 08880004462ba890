"""``--reweight correction`` (no stash; a second forward + backward over the affected samples)
gives the stash way's weights, runs no extra pass when every copy is kept, handles non-finite
rows exactly (a NaN loss) or by a non-finite step the loop skips (a NaN gradient of a finite
loss); ``auto`` picks by memory. tiny-llava, LoRA + projector, fp32, dropout 0, CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from aimkp.method.correction import choose_reweight, stash_bytes
from aimkp.method.nonfinite import grads_finite
from aimkp.method.options import StepOptions
from aimkp.method.step import aimkp_step, build_rows
from aimkp.spans import listening
from aimkp.train.config import TrainConfig
from tests.helpers.train import (
    lora_tiny_llava,
    mixed_strides,
    poison_row_loss,
    trainable_params,
    weights_after_step,
)


@pytest.fixture(scope="module")
def setup():
    return lora_tiny_llava(4)


_strides = mixed_strides


def _micro_steps(loaded, samples, way: str, split: int = 2, **kw):
    """Accumulated micro-steps of ``split`` samples each with ``reweight=way``: their results
    and the stride table."""
    n_total = float(sum(s.n_answer_tokens for s in samples))
    t = _strides()
    res = [
        aimkp_step(
            loaded,
            samples[i : i + split],
            list(range(i, i + split)),
            t,
            n_total,
            StepOptions(reweight=way, **kw),
        )
        for i in range(0, len(samples), split)
    ]
    return res, t


# AdamW's eps: with the default 1e-8 one step moves a coordinate whose gradient is ~1e-8 by
# lr * g / (|g| + eps), which turns float32 rounding of that gradient into up to ~0.5% of lr
# (measured 3e-6 to 6e-6 at lr 1e-3); eps 1e-5 keeps the comparison well-conditioned
ADAM_EPS = 1e-5


def _step_weights(loaded, run_step):
    """``(weights after run_step() and one AdamW step, the gradients it left, its result)``."""
    grads: list[torch.Tensor] = []

    def run():
        res = run_step()
        grads.extend(p.grad.detach().clone() for p in trainable_params(loaded))
        return res

    weights, res = weights_after_step(loaded, run, eps=ADAM_EPS)
    return (weights, grads), res


def _assert_same(a, b) -> None:
    """Gradients within 1e-6 of their scale (fp32 sums in another order), weights after one
    AdamW step (lr 1e-3, eps :data:`ADAM_EPS`) within 1e-6 (measured up to 4.6e-7)."""
    (wa, ga), (wb, gb) = a, b
    scale = max(float(g.abs().max()) for g in gb)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6 * scale, rtol=0)
    for x, y in zip(wa, wb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kw",
    [
        # image cosines are ~0.6-0.8 here: every image copy rejected; two accumulated micro-steps
        dict(tau_image=0.99),
        # GraNd (z-scores need >= 3 samples: one micro-step of 4) prunes, no copy rejected
        dict(tau_text=-2.0, tau_image=-2.0, grand_threshold=0.5, split=4),
    ],
    ids=["rejected-copies", "grand-pruned"],
)
def test_correction_matches_stash_after_adamw(setup, kw) -> None:
    loaded, samples = setup
    ref, (r_res, rt) = _step_weights(loaded, lambda: _micro_steps(loaded, samples, "stash", **kw))
    got, (g_res, gt) = _step_weights(
        loaded, lambda: _micro_steps(loaded, samples, "correction", **kw)
    )
    for r, g in zip(r_res, g_res):
        assert (r.reweight, g.reweight) == ("stash", "correction")
        assert r.correction_rows == 0
        assert torch.equal(r.decision.weights, g.decision.weights)
    changed = [g for g in g_res if not torch.equal(g.decision.weights, g.decision.provisional)]
    assert changed, "the test must exercise a changed weight (a correction pass)"
    for g in changed:  # every row of a sample with a changed weight ran again
        assert 0 < g.correction_rows <= g.n_rows
    assert torch.equal(rt.text, gt.text) and torch.equal(rt.image, gt.image)
    _assert_same(got, ref)


def test_no_rejection_runs_no_correction_pass(setup) -> None:
    loaded, samples = setup
    kw = dict(tau_text=-2.0, tau_image=-2.0)  # every copy kept
    ref, _ = _step_weights(loaded, lambda: _micro_steps(loaded, samples, "stash", **kw))
    got, ((ga, gb), _) = _step_weights(
        loaded, lambda: _micro_steps(loaded, samples, "correction", **kw)
    )
    assert all(bool(g.decision.kept.all()) for g in (ga, gb))
    assert (ga.correction_rows, gb.correction_rows) == (0, 0)
    assert ga.reweight == gb.reweight == "correction"
    _assert_same(got, ref)


def test_nan_loss_reruns_without_its_sample(setup, taps) -> None:
    """A non-finite loss is caught before the backward: the step re-runs over the other
    samples, which equals the stash way's exact removal."""
    loaded, samples = setup
    n_total = float(sum(s.n_answer_tokens for s in samples))
    rows = build_rows(samples, [0, 1, 2, 3], _strides())
    orig_1 = next(r for r, c in enumerate(rows) if c.sample == 1 and c.kind is None)
    opts = StepOptions(tau_image=0.99)
    poison_row_loss(taps, orig_1, calls=1)
    ref, _ = _step_weights(
        loaded, lambda: aimkp_step(loaded, samples, [0, 1, 2, 3], _strides(), n_total, opts)
    )
    poison_row_loss(taps, orig_1, calls=1)  # only the first forward of the step
    got, res = _step_weights(
        loaded,
        lambda: aimkp_step(
            loaded, samples, [0, 1, 2, 3], _strides(), n_total, replace(opts, reweight="correction")
        ),
    )
    assert res.nonfinite_rows == sum(c.sample == 1 for c in rows) > 1
    assert res.correction_rows > 0 and res.reweight == "correction"
    _assert_same(got, ref)


def _nan_gradient_of_row_0(loaded) -> torch.utils.hooks.RemovableHandle:
    """A forward hook on the first trainable linear layer (the projector's) making the output
    gradient of the first row's first token NaN (every loss stays finite)."""
    mod = next(
        m for m in loaded.model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad
    )

    def poison(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[0 if g.shape[0] > 1 else (0, 0)] = float("nan")  # first row / token of the first row
        return g

    def on_forward(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
        out.register_hook(poison)

    return mod.register_forward_hook(on_forward)


def test_nan_gradient_of_a_finite_loss_leaves_a_step_the_loop_skips(setup) -> None:
    loaded, samples = setup
    n_total = float(sum(s.n_answer_tokens for s in samples))
    params = trainable_params(loaded)
    for p in params:
        p.grad = None
    handle = _nan_gradient_of_row_0(loaded)
    try:
        res = aimkp_step(
            loaded, samples, [0, 1, 2, 3], _strides(), n_total, StepOptions(reweight="correction")
        )
    finally:
        handle.remove()
    assert res.nonfinite_rows > 0 and res.correction_rows == 0
    assert not grads_finite(params)  # what the loop checks before it skips the AdamW step
    for p in params:
        p.grad = None


def test_auto_picks_by_memory(setup, monkeypatch) -> None:
    loaded, samples = setup
    model = loaded.model
    assert TrainConfig().reweight == "auto"
    assert choose_reweight("auto", model, 10**9, 100, "cpu", None) == "stash"  # CPU: always
    need = stash_bytes(model, 1000, 3, 2)
    assert need > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * need, 10**12))
    assert choose_reweight("auto", model, 1000, 3, "cuda", torch.bfloat16) == "stash"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * need, 10**12))
    assert choose_reweight("auto", model, 1000, 3, "cuda", torch.bfloat16) == "correction"
    assert choose_reweight("correction", model, 1000, 3, "cpu", None) == "correction"
    with pytest.raises(ValueError, match="reweight"):
        choose_reweight("rows", model, 1000, 3, "cpu", None)
    n_total = float(sum(s.n_answer_tokens for s in samples))
    res = aimkp_step(
        loaded, samples, [0, 1, 2, 3], _strides(), n_total, StepOptions(reweight="auto")
    )
    assert res.reweight == "stash"
    for p in trainable_params(loaded):
        p.grad = None


def test_stash_bytes_of_a_linear_layer() -> None:
    lin = nn.Linear(6, 4)
    # tokens: 10 x (6 + 4) x 2 bytes = 200 < per-row grads 3 x 4 x 6 x 4 = 288
    assert stash_bytes(lin, 10, 3, 2) == 200
    assert stash_bytes(lin, 100, 3, 2) == 288  # long rows: the per-row gradients
    lin.weight.requires_grad_(False)
    assert stash_bytes(lin, 100, 3, 2) == 0


def test_loop_passes_the_flag_and_logs_the_way(tmp_path, caplog) -> None:
    """``TrainConfig.reweight`` reaches the step through the loop: two epochs (the second one
    with copies; tau_image 0.99 rejects the image ones) give the stash run's weights, and the
    backends line names the way."""
    import logging

    from aimkp.train.loop import train

    def run(way: str) -> dict[str, torch.Tensor]:
        cfg = TrainConfig(
            model="tiny-llava",
            data="default",
            output=str(tmp_path / way),
            epochs=2,
            batch_size=3,
            max_train_samples=6,
            lora_r=4,
            lora_alpha=8,
            lora_dropout=0.0,  # the correction pass is exact only with a deterministic forward
            lr=5e-3,
            projector_lr=1e-3,
            tau_image=0.99,
            eval_every_epoch=False,
            max_new_tokens=4,
            seed=3,
            reweight=way,
        )
        with caplog.at_level(logging.INFO):
            out = train(cfg)
        m = out["model"]
        return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    passes: list[str] = []

    def counted(name: str, event: str) -> None:
        if name == "correction" and event == "end":
            passes.append(name)

    with listening(counted):
        ref = run("stash")
        assert passes == []
        caplog.clear()
        got = run("correction")
    assert "'reweight': 'correction'" in caplog.text
    assert passes, "the run must exercise a correction pass"
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=0, msg=n)


def test_auto_keeps_the_stash_while_dropout_is_active(monkeypatch):
    """A second forward re-draws dropout masks, so auto never picks the correction then."""
    import torch
    from torch import nn

    from aimkp.method import correction as C

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.05)).train()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1, 10**12))  # no room: correction
    assert C.has_active_dropout(model)
    assert C.choose_reweight("auto", model, 100, 3, "cuda", None) == "stash"
    model.eval()
    assert not C.has_active_dropout(model)
    assert C.choose_reweight("auto", model, 10**9, 3, "cuda", None) == "correction"
