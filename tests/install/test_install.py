"""A non-editable install ships the Triton kernels (as aimkp.kernels) and the extension aimkp._C."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

CHECK = """
import pathlib, sys
target = pathlib.Path(sys.argv[1]).resolve()
import aimkp, aimkp._C, aimkp.kernels.masked_embedding as k
from aimkp.ops import masked_embedding, last_backend
import torch
for mod in (aimkp, aimkp._C, k):
    assert target in pathlib.Path(mod.__file__).resolve().parents, (mod.__name__, mod.__file__)
out = masked_embedding(torch.tensor([[1, 0, 2]]), torch.eye(3), backend="cpp")
assert torch.equal(out[0], torch.eye(3)[[1, 0, 2]]) and last_backend("masked_embedding") == "cpp"
print("installed-ok", aimkp._C.has_cuda())
"""


def _copy_sources(dst: pathlib.Path) -> None:
    """The files a build reads, copied: a fresh tree, so no stale build/ output is reused."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("aimkp", "kernels", "csrc"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dst / name)


@pytest.mark.slow
def test_non_editable_install_ships_kernels_and_extension(tmp_path: pathlib.Path) -> None:
    src, target = tmp_path / "src", tmp_path / "site"
    _copy_sources(src)
    env = dict(os.environ, AIMKP_SKIP_CUDA_BUILD="1")  # nvcc is covered by the editable build
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(src)],
        env=env, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert list((target / "aimkp" / "kernels").glob("masked_embedding.py"))
    assert list((target / "aimkp").glob("_C*.so"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run(
        [sys.executable, "-c", CHECK, str(target)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "installed-ok False" in res.stdout
