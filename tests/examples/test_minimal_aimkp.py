"""examples/minimal_aimkp.py runs (a handful of steps on a small subset) through the public API."""

from __future__ import annotations

import importlib.util
import math
import pathlib

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "minimal_aimkp.py"


def test_minimal_example_trains_with_copies(capsys) -> None:
    spec = importlib.util.spec_from_file_location("minimal_aimkp", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    last = module.main(["--samples", "8", "--epochs", "2", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert out.count("epoch ") == 2 and "text copies kept" in out
    assert math.isfinite(last["loss"]) and last["loss"] > 0
    # epoch 2 visits every post at stride 2: masked copies exist and the filter decided on them
    assert last["copies"] > 0
    assert 0.0 <= last["text_kept_rate"] <= 1.0 and 0.0 <= last["image_kept_rate"] <= 1.0
