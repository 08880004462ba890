"""The benchmarks' model shapes: ``--shape`` reaches each step benchmark's command line, and the
workload of the breakdown / scaling benchmarks builds and runs a 7B shape (at CPU size) and the
tiny preset at the image sizes of the scaling axis."""

from __future__ import annotations

import argparse
import math
import pathlib

import pytest

from benchmarks import runner
from benchmarks.common import resolve_shape
from benchmarks.workload import build_workload, run_aimkp
from tests.helpers.shapes import SMALL

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_the_shape_reaches_the_step_benchmarks_only():
    cmd = runner.command("train-step", True, "cuda", None, "qwen2vl7b")
    assert cmd[-2:] == ["--config", "gpu-qwen2vl7b"]
    assert runner.command("breakdown", True, "cuda", None, "qwen2vl7b")[-2:] == [
        "--shape",
        "qwen2vl7b",
    ]
    assert "--shape" not in runner.command("grad-gram", True, "cuda", None, "qwen2vl7b")
    assert "--config" not in runner.command("train-step", True, "cpu", None, "auto")


@pytest.mark.parametrize(
    ("shape", "device", "want"),
    [
        ("auto", "cpu", ("tiny", "cpu-tiny")),
        ("auto", "cuda", ("llava7b", "gpu-llava7b")),
        ("qwen2vl7b", "cuda", ("qwen2vl7b", "gpu-qwen2vl7b")),
        ("tiny", "cuda", ("tiny", "cpu-tiny")),
    ],
)
def test_resolve_shape(shape, device, want):
    assert resolve_shape(argparse.Namespace(shape=shape, device=device)) == want


@pytest.mark.parametrize("shape", sorted(SMALL))
def test_workload_runs_a_7b_shape(shape):
    w = build_workload(
        shape, batch_size=2, lora_rank=4, layers=1, vision_layers=1, overrides=SMALL[shape],
        image_px=112,
    )  # fmt: skip
    assert w.shape.startswith(("LLaVA-1.5-7B-shaped", "Qwen2-VL-7B-shaped"))
    assert "1/28 decoder layers" in w.shape or "1/32 decoder layers" in w.shape
    res = run_aimkp(w)
    assert res.n_rows == len(w.rows) and math.isfinite(res.loss)


def test_7b_expands_to_every_7b_shape_for_the_step_benchmarks_only():
    assert runner.shapes_of("breakdown", "7b") == ["llava7b", "qwen2vl7b"]
    assert runner.shapes_of("grad-gram", "7b") == ["auto"]
    assert runner.shapes_of("scaling", "qwen2vl7b") == ["qwen2vl7b"]


def test_the_tiny_workload_takes_the_image_size_of_the_scaling_axis():
    w = build_workload("tiny", batch_size=1, image_px=32)  # 4 x 4 patches of 8 px
    assert w.samples[0].image_span[1] - w.samples[0].image_span[0] == 16
    assert math.isfinite(run_aimkp(w).loss)
    assert build_workload("tiny", batch_size=1).samples[0].grid == (8, 8)  # restored: 64 px


def test_the_cli_offers_the_runners_shapes():
    from aimkp.cli.bench import SHAPE_CHOICES

    assert SHAPE_CHOICES == runner.SHAPES
