"""StepOptions is the one place the step's options live: built from TrainConfig and from the
Trainer integration's AimKPArguments by field name, checked on construction; the step opens
its phases as spans (listeners and torch.profiler see them) and its taps may replace values."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aimkp.integrations.transformers import AimKPArguments
from aimkp.method.options import StepOptions
from aimkp.method.step import aimkp_step
from aimkp.spans import listening, span, tap, tapping
from aimkp.train.config import TrainConfig
from aimkp.train.run import step_options
from tests.helpers.train import lora_tiny_llava, mixed_strides, zero_trainable_grads

# resolved by the caller (device, autocast) or a per-call choice (strides frozen in benchmarks)
NOT_CONFIGURED = {"device", "amp_dtype", "update_strides"}


def test_every_option_is_a_train_config_field_and_a_trainer_argument() -> None:
    names = {f.name for f in dataclasses.fields(StepOptions)} - NOT_CONFIGURED
    assert names <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert names <= {f.name for f in dataclasses.fields(AimKPArguments)}


def test_built_from_the_config_and_the_trainer_arguments() -> None:
    cfg = TrainConfig(tau_text=0.3, gf_reduce="sum", grand_threshold=2.0, mask_mode="auto")
    opts = step_options(cfg, torch.device("cpu"))
    assert (opts.tau_text, opts.tau_image, opts.gf_reduce) == (0.3, 0.4, "sum")
    assert (opts.grand_threshold, opts.mask_mode, opts.reweight) == (2.0, "compact", "auto")
    assert opts.device == torch.device("cpu") and opts.amp_dtype is None
    args = AimKPArguments(tau_image=0.6, reweight="correction")
    opts = args.step_options("cpu", bf16=True)
    assert (opts.tau_image, opts.reweight, opts.amp_dtype) == (0.6, "correction", torch.bfloat16)


def test_bad_choices_are_named() -> None:
    with pytest.raises(ValueError, match="reweight must be one of"):
        StepOptions(reweight="rows")
    with pytest.raises(ValueError, match="gf_reduce must be one of"):
        StepOptions(gf_reduce="max")
    with pytest.raises(TypeError, match="amp_dtype"):
        StepOptions(amp_dtype=True)  # type: ignore[arg-type]


def test_span_listeners_and_taps() -> None:
    marks: list[tuple[str, str]] = []
    with listening(lambda name, event: marks.append((name, event))):
        with pytest.raises(RuntimeError), span("outer"):
            with span("inner"):
                raise RuntimeError("the span still ends")
    assert marks == [("outer", "start"), ("inner", "start"), ("inner", "end"), ("outer", "end")]
    with span("quiet"):  # no listener left registered
        pass
    assert len(marks) == 4
    with tapping("value", lambda v: v + 1), tapping("value", lambda v: v * 10):
        assert tap("value", 1) == 20
    assert tap("value", 1) == 1


def test_the_step_opens_its_phases() -> None:
    loaded, samples = lora_tiny_llava(4)
    n_total = float(sum(s.n_answer_tokens for s in samples))
    opened: list[str] = []

    def on_span(name: str, event: str) -> None:
        if event == "start":
            opened.append(name)

    with (
        listening(on_span),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        aimkp_step(loaded, samples, [0, 1, 2, 3], mixed_strides(), n_total)
    zero_trainable_grads(loaded)
    assert opened[:4] == ["step", "plan_rows", "forward_backward", "forward"]
    assert "embedding_masking" in opened
    profiled = {e.name for e in prof.events()}
    assert {"aimkp.step", "aimkp.forward_backward", "aimkp.forward"} <= profiled
