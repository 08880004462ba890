"""Registers, shared memory and spills of every Triton kernel configuration aimkp launches, compiled
ahead of time for sm_80 and sm_90 (no GPU needed), and the occupancy they allow on an H100 / H200.

The configurations come from the launchers' own selection code (``gpu_launch_configs()`` of
``kernels/masked_embedding.py`` and ``kernels/grad_gram.py``: every tile over all widths, dtypes,
flags). Each is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))``; the cubin's resource usage is read with the ``cuobjdump -res-usage`` Triton ships
(``REG`` registers per thread, ``SHARED`` static shared bytes, ``LOCAL`` local-memory bytes per
thread: spills and stack arrays) and Triton's own metadata (dynamic shared bytes, warps,
stages). Occupancy per SM (H100 / H200: 65,536 registers, 228 KB shared memory, 2,048 threads,
32 blocks) is the smallest of the register, shared-memory and thread limits, registers allocated
per warp in units of 256.

By default it compiles a covering subset (every tile, dtype and flag value of each kernel at
least once, and the configurations the 7B shapes launch); ``--all`` compiles every
configuration (1,500+; tens of minutes on a small CPU). Writes
``benchmarks/results/triton_resources.json`` (with the Triton version) and prints a Markdown
table (``docs/gpu-resources.md`` quotes it).

Usage::

    python benchmarks/triton_resources.py [--all] [--arch 80 90] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from types import ModuleType
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "triton_resources.json"
KERNELS = ("masked_embedding", "grad_gram")
# H100 / H200 (sm_90) per SM; the A100 (sm_80) has 164 KB of shared memory, the rest the same
SM = {"regs": 65536, "shared": 228 * 1024, "threads": 2048, "blocks": 32, "warps": 64}
SM_SHARED = {80: 164 * 1024, 90: 228 * 1024}
# the widths the 7B shapes launch with: LLaVA-1.5 4096 / 11008, Qwen2-VL 3584 / 18944, LoRA r=128,
# rows of up to ~700 kept tokens
SHAPE_WIDTHS = (128, 3584, 4096, 11008, 18944)


def load_kernels(name: str) -> ModuleType:
    """``kernels/<name>.py`` of this checkout (not an installed ``aimkp.kernels``)."""
    path = REPO / "kernels" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"aimkp_kernels_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def configs(name: str) -> list[Any]:
    """Every launch configuration of ``kernels/<name>.py``."""
    return load_kernels(name).gpu_launch_configs()


def _features(cfg: Any) -> set[tuple]:
    """What a configuration exercises: each constexpr value and each argument type, by kernel."""
    out = {(cfg.name, k, v) for k, v in cfg.constexprs.items()}
    return out | {(cfg.name, k, v) for k, v in cfg.signature.items() if v.startswith("*")}


def covering_subset(cfgs: list[Any]) -> list[Any]:
    """A few configurations that together compile every kernel's every constexpr value and
    argument type at least once (greedy set cover: each pick adds the most not yet covered)."""
    feats = [_features(c) for c in cfgs]
    left = set().union(*feats) if feats else set()
    out = []
    while left:
        best = max(range(len(cfgs)), key=lambda i: len(feats[i] & left))
        out.append(cfgs[best])
        left -= feats[best]
    return out


def compile_config(cfg: Any, arch: int) -> Any:
    """``triton.compile`` of one configuration for ``sm_<arch>``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    names = cfg.kernel.arg_names
    sig = {n: cfg.signature[n] for n in names if n in cfg.signature}
    sig.update({n: "constexpr" for n in names if n in cfg.constexprs})
    src = ASTSource(fn=cfg.kernel, signature=sig, constexprs=cfg.constexprs)
    return compile(src, target=GPUTarget("cuda", arch, 32))


def _cuobjdump() -> str:
    import triton

    path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else "cuobjdump"


def resource_usage(compiled: Any) -> dict[str, int]:
    """Registers per thread, static / dynamic shared bytes, local (spill) bytes per thread, warps
    and stages of one compiled kernel."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        res = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", res.stdout))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump -res-usage gave no registers: {res.stdout} {res.stderr}")
    md = compiled.metadata
    return {
        "regs": int(fields["REG"]),
        "static_shared": int(fields.get("SHARED", 0)),
        "dynamic_shared": int(md.shared),
        "local": int(fields.get("LOCAL", 0)),
        "stack": int(fields.get("STACK", 0)),
        "num_warps": int(md.num_warps),
        "num_stages": int(getattr(md, "num_stages", 0)),
    }


def occupancy(regs: int, shared: int, num_warps: int, arch: int = 90) -> dict[str, float]:
    """Blocks per SM allowed by registers, shared memory and threads, and the warp occupancy."""
    warp_regs = math.ceil(regs * 32 / 256) * 256
    by_regs = SM["regs"] // (warp_regs * num_warps) if regs else SM["blocks"]
    # 1 KB per block is reserved by the system on sm_80 / sm_90
    by_shared = SM_SHARED[arch] // (shared + 1024)
    by_threads = SM["threads"] // (32 * num_warps)
    blocks = min(by_regs, by_shared, by_threads, SM["blocks"])
    limit = min(
        ("registers", by_regs), ("shared", by_shared), ("threads", by_threads), key=lambda x: x[1]
    )[0]
    return {"blocks_per_sm": blocks, "occupancy": blocks * num_warps / SM["warps"], "limit": limit}


def dtype_of(cfg: Any) -> str:
    """The data dtype of a configuration (``a/g`` for the grad-gram kernels' two inputs)."""
    sig = cfg.signature
    first = sig.get("a_ptr") or sig.get("out_ptr") or sig["grad_ptr"]
    return first.lstrip("*") + ("/" + sig["g_ptr"].lstrip("*") if "g_ptr" in sig else "")


def selected(name: str, widths: tuple[int, ...]) -> list[Any]:
    """The configurations the 7B shapes launch (bf16; the tiles of their widths)."""
    mod = load_kernels(name)
    out = []
    for cfg in mod.gpu_launch_configs():
        if dtype_of(cfg) not in ("bf16", "bf16/bf16"):
            continue
        if name == "masked_embedding":
            tiles = [mod._blocks(w) for w in widths]
        else:
            tiles = [mod.direct_blocks(i, o, True) for i in widths for o in widths]
            tiles += [mod.ghost_blocks(n, True) for n in (64, 256, 700)]
        if any(all(cfg.constexprs.get(k) == v for k, v in t.items()) for t in tiles):
            out.append(cfg)
    return out


def _key(cfg: Any) -> tuple:
    return cfg.name, tuple(cfg.signature.items()), tuple(sorted(cfg.constexprs.items()))


def measure(all_configs: bool, archs: list[int]) -> list[dict[str, Any]]:
    rows = []
    for name in KERNELS:
        cfgs = configs(name)
        if not all_configs:
            want = covering_subset(cfgs) + selected(name, SHAPE_WIDTHS)
            cfgs = list({_key(c): c for c in want}.values())
        for arch in archs:
            for cfg in cfgs:
                t0 = time.perf_counter()
                usage = resource_usage(compile_config(cfg, arch))
                shared = usage["static_shared"] + usage["dynamic_shared"]
                occ = occupancy(usage["regs"], shared, usage["num_warps"], arch)
                rows.append({
                    "module": name, "kernel": cfg.name, "arch": f"sm_{arch}",
                    "dtype": dtype_of(cfg),
                    **{k: v for k, v in cfg.constexprs.items()}, **usage, **occ,
                    "compile_s": round(time.perf_counter() - t0, 2),
                })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per kernel, arch and tile (the most registers / local bytes over its
    dtypes and flags)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        tile = ", ".join(f"{k}={r[k]}" for k in sorted(r) if k.startswith("BLOCK_"))
        groups.setdefault((r["kernel"], r["arch"], tile), []).append(r)
    lines = [
        "| kernel | arch | tile | configs | regs | shared KB | local B | warps | blocks/SM "
        "| occupancy | limit |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]  # fmt: skip
    for (kernel, arch, tile), rs in sorted(groups.items()):
        w = max(rs, key=lambda r: (r["local"], r["regs"]))
        shared = (w["static_shared"] + w["dynamic_shared"]) / 1024
        lines.append(
            f"| {kernel} | {arch} | {tile} | {len(rs)} | {max(r['regs'] for r in rs)} | "
            f"{shared:.1f} | {max(r['local'] for r in rs)} | {w['num_warps']} | "
            f"{min(r['blocks_per_sm'] for r in rs)} | {min(r['occupancy'] for r in rs):.0%} | "
            f"{w['limit']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every configuration, not the cover")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # a real compile, not the interpreter
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    t0 = time.perf_counter()
    rows = measure(args.all, args.arch)
    report = {
        "triton": triton.__version__,
        "configs": "all" if args.all else "cover + 7B shapes",
        "sm": SM,
        "rows": rows,
    }
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(rows))
    spills = [r for r in rows if r["local"]]
    print(
        f"\n{len(rows)} kernels compiled in {time.perf_counter() - t0:.0f} s (Triton "
        f"{triton.__version__}); {len(spills)} with local memory (spills); wrote {args.out}"
    )


if __name__ == "__main__":
    main()
