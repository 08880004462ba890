"""Non-finite values never reach the weights: a poisoned row is excluded exactly (AimKP with the
engine, SFT by a re-run over the finite samples), non-finite steps are skipped and K in a row stop
the run (exit 3), and no checkpoint is written with a non-finite weight."""

from __future__ import annotations

import copy

import pytest
import torch

from aimkp.errors import NonFiniteError
from aimkp.method.step import aimkp_step, build_rows, sft_step
from tests.helpers.models import _one_thread  # noqa: F401 - autouse: single-threaded tests
from tests.helpers.train import lora_tiny_llava, mixed_strides
from tests.helpers.train import poison_row_loss as _poison
from tests.helpers.train import weights_after_step as _step_weights


@pytest.fixture(scope="module")
def setup():
    return lora_tiny_llava(4)


_strides = mixed_strides


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_nan_original_excludes_its_whole_sample(setup, monkeypatch) -> None:
    loaded, samples = setup
    n_total = float(sum(s.n_answer_tokens for s in samples))
    rows = build_rows(samples, [0, 1, 2, 3], _strides())
    orig_1 = next(r for r, c in enumerate(rows) if c.sample == 1 and c.kind is None)
    n_rows_1 = sum(c.sample == 1 for c in rows)
    t_ref = _strides()
    ref, _ = _step_weights(
        loaded,
        lambda: aimkp_step(loaded, [samples[i] for i in (0, 2, 3)], [0, 2, 3], t_ref, n_total),
    )
    _poison(monkeypatch, orig_1)
    t = _strides()
    got, res = _step_weights(loaded, lambda: aimkp_step(loaded, samples, [0, 1, 2, 3], t, n_total))
    assert res.nonfinite_rows == n_rows_1 > 1
    assert torch.equal(t.text, t_ref.text) and torch.equal(t.image, t_ref.image)  # 1 untouched
    assert res.n_answer_tokens == n_total - samples[1].n_answer_tokens
    _assert_same(got, ref)


def test_nan_copy_row_is_removed_like_a_rejected_copy(setup, monkeypatch) -> None:
    loaded, samples = setup
    n_total = float(sum(s.n_answer_tokens for s in samples))
    rows = build_rows(samples, [0, 1, 2, 3], _strides())
    text_0 = next(r for r, c in enumerate(rows) if c.sample == 0 and c.kind == "text")
    t_ref = _strides()
    t_ref.text[0] = 1  # the same step without sample 0's text copy
    kw = dict(update_strides=False)
    ref, _ = _step_weights(
        loaded, lambda: aimkp_step(loaded, samples, [0, 1, 2, 3], t_ref, n_total, **kw)
    )
    _poison(monkeypatch, text_0)
    got, res = _step_weights(
        loaded, lambda: aimkp_step(loaded, samples, [0, 1, 2, 3], _strides(), n_total, **kw)
    )
    assert res.nonfinite_rows == 1 and not bool(res.decision.kept[text_0])
    _assert_same(got, ref)


def test_sft_nan_row_reruns_over_the_finite_samples(setup, monkeypatch) -> None:
    loaded, samples = setup
    n_total = float(sum(s.n_answer_tokens for s in samples))
    ref, _ = _step_weights(
        loaded, lambda: sft_step(loaded, [samples[i] for i in (0, 2, 3)], n_total)
    )
    _poison(monkeypatch, 1, calls=1)
    got, res = _step_weights(loaded, lambda: sft_step(loaded, samples, n_total))
    assert res.nonfinite_rows == 1 and res.n_rows == 4
    _assert_same(got, ref)


def _cfg(out, **kw):
    from aimkp.train.config import TrainConfig

    base = dict(
        model="tiny-llava",
        output=str(out),
        epochs=1,
        batch_size=2,
        max_train_samples=6,
        lora_r=4,
        lora_alpha=8,
        eval_every_epoch=False,
        max_new_tokens=4,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_k_skipped_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys) -> None:
    import aimkp.train.distributed as D
    from aimkp.cli import main

    # the data-parallel strategy's finiteness check (DataParallel.reduce_grads)
    monkeypatch.setattr(D, "grads_finite", lambda params: False)
    out = tmp_path / "run"
    code = main(
        ["train", "--preset", "tiny-llava", "--output", str(out), "--max-train-samples", "6",
         "--batch-size", "1", "--epochs", "1", "--no-eval", "--lora-r", "4",
         "--max-skipped-steps", "2"]
    )  # fmt: skip
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("aimkp")]
    assert code == 3
    assert (
        len(err) == 1
        and err[0].startswith("aimkp train: error:")
        and "2 optimizer steps in a row had non-finite gradients" in err[0]
    )
    assert not (out / "last").exists()


def test_huge_lr_ends_finite_or_stops_with_the_message(tmp_path) -> None:
    from aimkp.method.nonfinite import nonfinite_params
    from aimkp.train.loop import train

    cfg = _cfg(
        tmp_path / "r",
        epochs=2,
        lr=1e6,
        projector_lr=1e6,
        full_finetune=True,
        max_grad_norm=None,
        max_skipped_steps=3,
    )
    try:
        summary = train(cfg)
    except NonFiniteError as exc:
        assert "non-finite" in str(exc)
        return
    assert nonfinite_params(summary["model"]) == []
    assert summary["nonfinite_rows"] + summary["nonfinite_skipped_steps"] > 0


def test_no_checkpoint_with_a_non_finite_weight(setup, tmp_path) -> None:
    from aimkp.method.nonfinite import check_finite_weights

    loaded, _ = setup
    model = copy.deepcopy(loaded.model)
    p = next(p for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        p.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to write"):
        check_finite_weights(model, str(tmp_path / "best"))
    check_finite_weights(loaded.model, "x")  # finite: no error
