"""A non-editable install ships the Triton kernels (as aimkp.kernels) and the extension aimkp._C."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

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


@pytest.mark.slow
def test_non_editable_install_ships_kernels_and_extension(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "site"
    env = dict(os.environ, AIMKP_SKIP_CUDA_BUILD="1")  # nvcc is covered by the editable build
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)],
        check=True, env=env, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
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
