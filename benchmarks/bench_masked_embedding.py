"""Benchmark of aimkp.ops.masked_embedding against the eager PyTorch composite and torch.compile.

Providers
- ``aimkp``: the fused op (Triton on CUDA, the C++ extension on CPU; the backend that ran is
  asserted through ``aimkp.ops.last_backend``), plus ``aimkp-cuda`` (CUDA C++) on GPUs.
- ``eager``: what a model does without it: embedding lookup, vision-feature merge with
  ``masked_scatter``, masking with ``where`` (dense) or ``index_select`` (compact), separate ops.
- ``compile``: ``torch.compile`` of that composite.

Modes: ``fwd``, ``bwd`` (backward alone, graph kept), ``fwd+bwd``. Reported: median ms, GB/s over
the minimal bytes (rows read + rows written + ids/keep; backward: upstream gradient read + dense
weight / feature / fill gradients written) and the fraction of this device's measured copy
bandwidth. Each row records device, dtype, shapes, versions and commit (benchmarks/common.py).

Usage::

    python -m benchmarks.bench_masked_embedding            # B=8 T=1024 D=2048 V=32000 (a few min)
    python -m benchmarks.bench_masked_embedding --quick    # small config, seconds
    python -m benchmarks.bench_masked_embedding --thp      # PyTorch's huge-page CPU allocations

On the CPU, first-touch page faults of the fresh output / gradient buffers (64 MB and 262 MB here)
cost more than the copies themselves in a VM; ``--thp`` sets PyTorch's own switch
``THP_MEM_ALLOC_ENABLE=1`` (before torch is imported) for every provider alike.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

if "--thp" in sys.argv:  # must precede the torch import: read by c10's CPU allocator
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

import torch
import torch.nn.functional as F

from aimkp.ops import CompactEmbedding, last_backend, masked_embedding
from benchmarks.common import env_info, print_table, sync, time_fn, write_results

IMG_H = IMG_W = 24  # LLaVA-1.5: 576 image tokens on a 24 x 24 grid


def make_batch(b: int, t: int, d: int, v: int, dtype: torch.dtype, device: str) -> dict:
    """Rows: [prefix 5][image 576 (or fewer)][post text][answer 24]; a third of the rows are
    originals, a third text-masked copies (stride 2), a third image-masked copies (stride 2:
    rows 1::2, cols 1::2 of the grid kept), as Progressive Modality Masking builds them."""
    g = torch.Generator().manual_seed(0)
    n_img = min(IMG_H * IMG_W, max(0, t - 64))
    side = int(n_img**0.5)
    n_img = side * side
    image_token_id = v  # outside the vocabulary (LLaVA's reference code uses -200)
    ids = torch.randint(0, v, (b, t), generator=g)
    ids[:, 5 : 5 + n_img] = image_token_id
    keep = torch.ones(b, t, dtype=torch.bool)
    text0, text1 = 5 + n_img, t - 24
    keep[1::3, text0 + 0 : text1 : 2] = False  # text copy: keep offsets 1, 3, 5, ...
    grid = torch.zeros(side, side, dtype=torch.bool)
    grid[1::2, 1::2] = True
    keep[2::3, 5 : 5 + n_img] = grid.reshape(-1)
    return {
        "input_ids": ids.to(device),
        "weight": torch.randn(v, d, generator=g).to(device=device, dtype=dtype),
        "keep": keep.to(device),
        "image_features": torch.randn(b * n_img, d, generator=g).to(device=device, dtype=dtype),
        "image_token_id": image_token_id,
        "fill": torch.randn(d, generator=g).to(device=device, dtype=dtype),
    }


def eager_composite(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    image_features: torch.Tensor,
    image_token_id: int,
    fill: torch.Tensor,
    compact: bool,
) -> torch.Tensor:
    is_img = input_ids == image_token_id
    emb = F.embedding(input_ids.masked_fill(is_img, 0), weight)
    emb = emb.masked_scatter(is_img[..., None], image_features)
    if compact:
        index = torch.nonzero(keep.reshape(-1)).reshape(-1)
        return emb.reshape(-1, weight.shape[1]).index_select(0, index)
    return torch.where(keep[..., None], emb, fill)


def copy_bandwidth_gbs(device: str) -> float:
    """Measured device copy bandwidth (read + write bytes / s) on a 512 MiB buffer."""
    x = torch.empty(2**27, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), device, warmup=2, rep=5)
    return 2 * x.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9


def minimal_bytes(batch: dict, compact: bool, mode: str) -> int:
    ids, keep, w = batch["input_ids"], batch["keep"], batch["weight"]
    es = w.element_size()
    n, (v, d) = ids.numel(), w.shape
    m = batch["image_features"].shape[0]
    k = int(keep.sum())
    out_rows = k if compact else n
    src_rows = k  # kept rows read a table / feature row; hidden rows only the fill row
    fwd = n * (8 + 1) + src_rows * d * es + out_rows * d * es
    bwd = n * (8 + 1) + out_rows * d * es + (v + m + 1) * d * es
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def bench_case(
    name: str,
    fn: Callable[[dict], torch.Tensor],
    batch: dict,
    mode: str,
    device: str,
    rep: int,
    expect_backend: str | None,
) -> dict:
    leaves = {k: batch[k] for k in ("weight", "image_features", "fill")}
    if mode == "fwd":
        args = {**batch}

        def run() -> torch.Tensor:
            with torch.no_grad():
                return fn(args)
    else:
        args = {**batch, **{k: t.detach().requires_grad_(True) for k, t in leaves.items()}}
        inputs = tuple(args[k] for k in leaves)
        out = fn(args)
        up = torch.randn_like(out)
        if mode == "bwd":

            def run() -> None:
                torch.autograd.grad(out, inputs, up, retain_graph=True, allow_unused=True)
        else:

            def run() -> None:
                torch.autograd.grad(fn(args), inputs, up, allow_unused=True)

    t = time_fn(run, device, warmup=2, rep=rep)
    if expect_backend is not None:
        got = last_backend("masked_embedding")
        assert got == expect_backend, f"{name} ran backend {got!r}, expected {expect_backend!r}"
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small config (B=3 T=256 D=256 V=1000)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd")
    p.add_argument("--providers", default="aimkp,aimkp-cuda,eager,compile")
    p.add_argument("--rep", type=int, default=None)
    p.add_argument("--thp", action="store_true", help="THP_MEM_ALLOC_ENABLE=1 for all providers")
    args = p.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    b, t, d, v = (3, 256, 256, 1000) if args.quick else (8, 1024, 2048, 32000)
    rep = args.rep or (5 if device == "cpu" and not args.quick else 10)
    batch = make_batch(b, t, d, v, dtype, device)
    env = env_info(device)
    bw = copy_bandwidth_gbs(device)
    keep_ratio = batch["keep"].float().mean().item()
    print(f"{env['device']}  dtype={args.dtype}  B={b} T={t} D={d} V={v}  "
          f"image tokens/row={batch['image_features'].shape[0] // b}  keep={keep_ratio:.3f}  "
          f"copy bandwidth={bw:.1f} GB/s")  # fmt: skip

    aimkp_backend = "triton" if device == "cuda" else "cpp"
    providers: dict[str, tuple[Callable[[dict, bool], torch.Tensor], str | None]] = {}
    for prov in args.providers.split(","):
        if prov == "aimkp":
            providers[prov] = (
                lambda a, c: masked_embedding(**a, compact=c, backend=aimkp_backend),
                aimkp_backend,
            )
        elif prov == "aimkp-cuda":
            from aimkp._ext import has_cuda_kernels

            if device == "cuda" and has_cuda_kernels():
                providers[prov] = (
                    lambda a, c: masked_embedding(**a, compact=c, backend="cuda"),
                    "cuda",
                )
        elif prov == "eager":
            providers[prov] = (lambda a, c: eager_composite(**a, compact=c), None)
        elif prov == "compile":
            compiled = torch.compile(eager_composite)
            providers[prov] = (lambda a, c, f=compiled: f(**a, compact=c), None)
        else:
            raise SystemExit(f"unknown provider {prov!r}")

    # Correctness gate: every provider gives the same forward.
    for compact in (False, True):
        outs = {n: f(batch, compact) for n, (f, _) in providers.items()}
        outs = {n: (o.values if isinstance(o, CompactEmbedding) else o) for n, o in outs.items()}
        ref = next(iter(outs.values()))
        for n, o in outs.items():
            assert torch.equal(o, ref), f"{n} differs from the first provider (compact={compact})"
    sync(device)

    rows = []
    for compact in (False, True):
        layout = "compact" if compact else "dense"
        for mode in args.modes.split(","):
            nbytes = minimal_bytes(batch, compact, mode)
            for name, (f, expect) in providers.items():

                def call(a: dict, f=f, compact=compact) -> torch.Tensor:
                    out = f(a, compact)
                    return out.values if isinstance(out, CompactEmbedding) else out

                tm = bench_case(name, call, batch, mode, device, rep, expect)
                gbs = nbytes / (tm["median_ms"] * 1e-3) / 1e9
                rows.append({
                    **env, "op": "masked_embedding", "provider": name, "layout": layout,
                    "mode": mode, "dtype": args.dtype, "B": b, "T": t, "D": d, "V": v,
                    "image_tokens": batch["image_features"].shape[0], "keep_ratio": keep_ratio,
                    "backend": last_backend("masked_embedding") if expect else "torch",
                    "ms": tm["median_ms"], "min_ms": tm["min_ms"], "runs": tm["runs"],
                    "bytes": nbytes, "GB/s": gbs, "copy_GB/s": bw, "frac_copy_bw": gbs / bw,
                    "loadavg_1m": os.getloadavg()[0],  # other work sharing this machine
                    "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
                })  # fmt: skip
    # Ratios: eager / aimkp and compile / aimkp time, per layout and mode.
    by = {(r["provider"], r["layout"], r["mode"]): r["ms"] for r in rows}
    for r in rows:
        base = by.get(("aimkp", r["layout"], r["mode"]))
        r["speedup_of_aimkp"] = r["ms"] / base if base else None
    print_table(rows, ["provider", "backend", "layout", "mode", "ms", "GB/s", "frac_copy_bw",
                       "speedup_of_aimkp"])  # fmt: skip
    for layout in ("dense", "compact"):
        for mode in args.modes.split(","):
            msg = [f"{layout:8s} {mode:8s}"]
            for prov in ("eager", "compile"):
                if (prov, layout, mode) in by and ("aimkp", layout, mode) in by:
                    ratio = by[(prov, layout, mode)] / by[("aimkp", layout, mode)]
                    msg.append(f"aimkp is {ratio:.2f}x faster than {prov}")
            print("  ".join(msg))
    name = "masked_embedding-quick" if args.quick else "masked_embedding"
    if args.dtype != "float32":
        name += f"-{args.dtype}"
    if args.thp:
        name += "-thp"
    for path in write_results(name, rows):
        print("wrote", path)


if __name__ == "__main__":
    main()
