"""pytest set-up for the CPU-sized benchmark cases (``pytest benchmarks/ --benchmark-only``).

Not collected by ``make test`` (pyproject's ``testpaths`` is ``tests/``). The project's
``addopts`` disable benchmarks for the test suite; this folder turns them back on unless
``--benchmark-disable`` was given on the command line itself.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    if "--benchmark-disable" not in config.invocation_params.args:
        config.option.benchmark_disable = False
