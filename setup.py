"""Build of the aimkp package and its one native extension, ``aimkp._C``.

The extension is plain pybind11 C++17 (OpenMP CPU kernels) and, when a CUDA toolchain is found or
``AIMKP_FORCE_CUDA=1`` is set, CUDA sources compiled with nvcc. It does not link libtorch: tensors
cross the boundary as raw data pointers, sizes and dtype codes (and the current CUDA stream as an
integer), so one build serves every torch version and the build itself needs no torch.
CUDA's runtime is linked statically, so importing ``aimkp._C`` never needs a GPU or libcudart.

Environment switches (the table in docs/development.md): AIMKP_FORCE_CUDA, AIMKP_SKIP_CUDA_BUILD,
AIMKP_CUDA_ARCHS, CUDA_HOME, MAX_JOBS.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_home(nvcc: str) -> str:
    # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc exec-ing the real one), so its own
    # location does not always tell the toolkit root: take the first candidate with the headers.
    candidates = [
        os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"),
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        "/usr/local/cuda",
    ]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _want_cuda() -> tuple[bool, str | None]:
    if _truthy("AIMKP_SKIP_CUDA_BUILD"):
        return False, None
    nvcc = _find_nvcc()
    if nvcc is None:
        if _truthy("AIMKP_FORCE_CUDA"):
            raise RuntimeError("AIMKP_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME).")
        warnings.warn(
            "aimkp: nvcc not found; building the CPU-only extension (CUDA kernels skipped). "
            "Triton kernels still run on CUDA devices.",
            stacklevel=1,
        )
        return False, None
    return True, nvcc


def _cuda_archs() -> list[str]:
    archs = os.environ.get("AIMKP_CUDA_ARCHS", "80;90")
    return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]


class BuildExt(build_ext):
    """build_ext that compiles ``.cu`` sources with nvcc in parallel (MAX_JOBS) and links them."""

    def build_extension(self, ext):  # noqa: D401 - setuptools hook
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        if cu_sources:
            nvcc = ext._aimkp_nvcc  # type: ignore[attr-defined]
            build_dir = os.path.join(self.build_temp, "cuda")
            os.makedirs(build_dir, exist_ok=True)
            import pybind11

            includes = [pybind11.get_include(), os.path.join(ROOT, "csrc")]
            gencode = []
            for a in _cuda_archs():
                gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
            jobs = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))

            def compile_one(src: str) -> str:
                obj = os.path.join(build_dir, os.path.basename(src) + ".o")
                cmd = [
                    nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--use_fast_math",
                    "-Xcompiler", "-fPIC", "-DAIMKP_WITH_CUDA",
                    *[f"-I{i}" for i in includes], *gencode,
                ]  # fmt: skip
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd)
                return obj

            with ThreadPoolExecutor(jobs) as pool:
                objs = list(pool.map(compile_one, cu_sources))
            ext.extra_objects = list(ext.extra_objects or []) + objs
        if self.parallel is None and os.environ.get("MAX_JOBS"):
            self.parallel = int(os.environ["MAX_JOBS"])
        super().build_extension(ext)


def _extension() -> Pybind11Extension:
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    with_cuda, nvcc = _want_cuda()
    macros = []
    libs: list[str] = []
    lib_dirs: list[str] = []
    link_args = ["-fopenmp"]
    if with_cuda and cu:
        home = _cuda_home(nvcc)
        macros.append(("AIMKP_WITH_CUDA", "1"))
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            d = os.path.join(home, sub)
            if os.path.isdir(d):
                lib_dirs.append(d)
        # Static runtime: importing aimkp._C must work on machines without a GPU or libcudart.
        libs += ["cudart_static", "dl", "rt", "pthread"]
    else:
        cu = []
    ext = Pybind11Extension(
        "aimkp._C",
        cpp + cu,
        cxx_std=17,
        include_dirs=["csrc"],
        define_macros=macros,
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=link_args,
        libraries=libs,
        library_dirs=lib_dirs,
    )
    ext._aimkp_nvcc = nvcc  # type: ignore[attr-defined]
    return ext


packages = find_packages(include=["aimkp", "aimkp.*"]) + ["aimkp.kernels"]

setup(
    packages=packages,
    package_dir={"aimkp.kernels": "kernels"},
    ext_modules=[_extension()] if glob.glob("csrc/**/*.cpp", recursive=True) else [],
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
