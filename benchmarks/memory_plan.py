"""Memory plan of the AimKP step at a 7B shape (LLaVA-1.5-7B, Qwen2-VL-7B), measured on one layer.

What the exact reweight keeps until the filter decides (the engine's stash: per LoRA layer the
tokens - inputs and output gradients - or the per-row gradients) is the engine's memory risk at
scale. This builds a 7B shape (``--shape``, :mod:`aimkp.models.shapes`) with ONE decoder layer
and ONE vision layer (``llava7b``: Llama 4096 / 11008 / 32 heads, vocab 32,064, CLIP
ViT-L/14-336 with 576 image tokens; ``qwen2vl7b``: Qwen2 3584 / 18944 / 28 heads with 4 KV
heads, vocab 152,064, its ViT at 672 px with 576 image tokens), LoRA r=128 on every language
linear layer + the projector, random weights, fp32 on the CPU, and measures for a few samples
(strides 2 / 2: original + text copy + image copy per sample):

- the AimKP step's peak memory above the weights (torch profiler's CPU memory timeline, as in
  ``benchmarks/common.py``; CUDA: the allocator's peak), for each engine reweight storage
  (``tokens``, ``rows``, ``auto``) and for the reference algorithm (``aimkp/method/reference.py``);
- what the engine keeps per decoder layer: the stash tensors' bytes counted directly (storage
  de-duplicated), and the activations autograd saves inside that layer (saved-tensor hooks,
  weights excluded).

It then extrapolates to the real depth (32 / 28 decoder layers, 24 / 32 vision layers: frozen,
their weights counted; a frozen tower saves no activations for the backward) and B samples
(default 8: 24 rows) in bf16, next to 80 GB and
141 GB (``extrapolate``): everything that scales with tokens is scaled linearly from the measured
samples (rows, kept tokens and image tokens per sample are the same for every sample of the
default data to within their text lengths); bf16 halves the element size of activations and of
the ``tokens`` stash (a dtype change: under bf16 autocast those tensors are bf16), and not of the
``rows`` stash (the engine keeps per-row gradients in fp32) nor of trainable weights, their
gradients and AdamW state (fp32). Frozen weights are counted for the full-depth model in bf16.

Usage::

    python -m benchmarks.bench_train_step --config gpu-llava7b --memory-plan [--samples 1]
    python -m benchmarks.memory_plan --samples 2 --batch 8 [--shape qwen2vl7b]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from aimkp.models.shapes import SHAPES, llava7b_text, qwen2vl7b_text

GB = 1e9
DEVICE_GB = (80, 141)
STORAGES = ("tokens", "rows", "auto")
TEXT_CONFIGS = {"llava7b": llava7b_text, "qwen2vl7b": qwen2vl7b_text}


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> dict[str, int]:
    """Bytes of the tensors reachable from ``obj`` (tensors, dataclasses, tuples / lists /
    dicts, plain objects' attributes), each storage once: ``{"float": ..., "other": ...}``."""
    seen = set() if seen is None else seen
    out = {"float": 0, "other": 0}

    def walk(x: Any, depth: int = 0) -> None:
        if depth > 4 or x is None:
            return
        if isinstance(x, torch.Tensor):
            ptr = x.untyped_storage().data_ptr()
            if ptr in seen or x.numel() == 0:
                return
            seen.add(ptr)
            out["float" if x.is_floating_point() else "other"] += x.untyped_storage().nbytes()
            return
        if isinstance(x, (list, tuple)):
            for y in x:
                walk(y, depth + 1)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y, depth + 1)
        elif dataclasses.is_dataclass(x) or hasattr(x, "__dict__"):
            for y in vars(x).values():
                walk(y, depth + 1)

    walk(obj)
    return out


@dataclasses.dataclass
class StashCount:
    """Stash bytes of one step: per decoder layer 0 and elsewhere, by stash kind."""

    layer_tokens: int = 0  # Tokens kept (activation dtype: halves in bf16)
    layer_rows: int = 0  # per-row gradients (fp32 always)
    layer_shared: int = 0  # of layer_tokens: storages autograd also saved (layer inputs)
    other: int = 0  # projector and any module outside the decoder layers
    kinds: dict[str, int] = dataclasses.field(default_factory=dict)


def count_stash(gram: Any, layer_prefix: str, saved: set[int]) -> StashCount | None:
    """What ``gram`` keeps for ``reweight`` (None where this engine exposes no stash list);
    ``saved``: storages autograd saved in the layer (the stash shares the layer inputs)."""
    stash = getattr(gram, "_stash", None)  # the engine's ReweightStash (private: a benchmark)
    if stash is None:
        return None
    c = StashCount()
    seen: set[int] = set()
    for st, kept in stash.entries:
        before = set(seen)
        b = tensor_bytes(kept, seen)
        n = b["float"] + b["other"]
        kind = "rows" if "RowGrads" in type(kept).__name__ else "tokens"
        c.kinds[kind] = c.kinds.get(kind, 0) + n
        if layer_prefix in f"{st.name}.":
            if kind == "rows":
                c.layer_rows += n
            else:
                c.layer_tokens += n
                shared = (seen - before) & saved
                c.layer_shared += tensor_bytes(
                    [t for t in _tensors(kept) if t.untyped_storage().data_ptr() in shared]
                )["float"]
        else:
            c.other += n
    return c


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensor attributes of one stash entry (a / g / rows / offsets / extra, or G / S)."""
    vals = vars(obj).values() if hasattr(obj, "__dict__") else obj
    return [v for v in vals if isinstance(v, torch.Tensor)]


@contextlib.contextmanager
def saved_in_layer(layer: torch.nn.Module, params: set[int]) -> Iterator[dict[str, int]]:
    """Bytes autograd saves for the backward while ``layer`` runs forward (weights excluded)."""
    inside = [False]
    seen: set[int] = set()
    out: dict[str, Any] = {"bytes": 0, "scores": 0, "ptrs": seen}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0] and isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen and ptr not in params:
                seen.add(ptr)
                # [.., H, T, T] attention probabilities: the CPU's math SDPA keeps them, the
                # GPU's FlashAttention kernels keep none (O(T) statistics)
                square = t.dim() == 4 and t.shape[-1] == t.shape[-2] >= 16
                out["scores" if square else "bytes"] += t.untyped_storage().nbytes()
        return t

    h1 = layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    h2 = layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield out
    finally:
        h1.remove()
        h2.remove()


@contextlib.contextmanager
def engine_storage(storage: str, counts: list, saved: set[int]) -> Iterator[None]:
    """Make ``aimkp_step``'s engine keep ``storage`` and record its stash after the backward
    (through the step's ``grad_gram`` tap, :mod:`aimkp.spans`)."""
    from aimkp.spans import tapping

    class Counting:
        def __init__(self, gram: Any, prefix: str) -> None:
            self.gram, self.prefix = gram, prefix

        def __enter__(self) -> Any:
            return self.gram.__enter__()

        def __exit__(self, *exc: Any) -> Any:
            r = self.gram.__exit__(*exc)
            counts.append(count_stash(self.gram, self.prefix, saved))
            return r

    def counting(make: Any) -> Any:
        def make_counting(model: Any, **kw: Any) -> Any:
            return Counting(make(model, reweight_storage=storage, **kw), engine_storage.prefix)

        return make_counting

    with tapping("grad_gram", counting):
        yield


engine_storage.prefix = ".layers.0."


def param_split(
    model: torch.nn.Module, layer: torch.nn.Module, vision_layer: torch.nn.Module | None = None
) -> dict[str, int]:
    """Parameter counts: frozen / trainable, inside decoder layer 0, inside vision layer 0
    (``frozen_vision_layer``: the tower is frozen) and elsewhere."""
    in_layer = {id(p) for p in layer.parameters()}
    in_vision = {id(p) for p in vision_layer.parameters()} if vision_layer is not None else set()
    out = {"frozen_layer": 0, "frozen_other": 0, "train_layer": 0, "train_other": 0}
    out["frozen_vision_layer"] = 0
    for p in model.parameters():
        if id(p) in in_vision and not p.requires_grad:
            out["frozen_vision_layer"] += p.numel()
            continue
        key = ("train" if p.requires_grad else "frozen") + (
            "_layer" if id(p) in in_layer else "_other"
        )
        out[key] += p.numel()
    return out


def first_block(tower: torch.nn.Module) -> torch.nn.Module:
    """Block 0 of a vision tower: the first ``ModuleList`` in it holds the transformer blocks
    (CLIP's ``encoder.layers``, Qwen2-VL's ``blocks``)."""
    stack = next(m for m in tower.modules() if isinstance(m, torch.nn.ModuleList))
    return stack[0]


def _at(m: dict[str, Any], batch: int) -> tuple[int, int, int]:
    """:func:`extrapolate`'s (layers, batch, vision_layers) at the real depth of ``m``'s shape."""
    layers, vision = full_depth(m)
    return layers, batch, vision


def full_depth(m: dict[str, Any]) -> tuple[int, int]:
    """(decoder layers, vision layers) of the real model a measured row extrapolates to."""
    return m.get("layers_full", 32), m.get("vision_layers_full", 1)


def extrapolate(
    m: dict[str, Any], layers: int, batch: int, vision_layers: int = 1
) -> dict[str, float]:
    """GB at ``layers`` decoder layers and ``batch`` samples in bf16 (see the module doc).

    ``m``: measured bytes at 1 layer and ``m["samples"]`` samples: ``peak`` (step above the
    weights), ``saved`` (activations saved in layer 0), ``stash_tokens`` / ``stash_rows``
    (layer 0's stash by kind), ``stash_other``, and the parameter split ``params``."""
    scale = batch / m["samples"]
    p = m["params"]
    half = 2 / m.get("act_bytes", 4)  # measured in fp32 (CPU): bf16 halves; measured bf16: 1
    vision = p.get("frozen_vision_layer", 0) * vision_layers
    weights = (p["frozen_layer"] * layers + vision + p["frozen_other"]) * 2
    trainable = p["train_layer"] * layers + p["train_other"]
    state = trainable * 4 * 4  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq
    # upper bound of what is live at once: autograd's saved activations (freed layer by layer in
    # the backward) + the stash not shared with them (kept from the backward to the reweight)
    own_tokens = m["stash_tokens"] - m.get("stash_shared", 0)
    per_layer = (m["saved"] + own_tokens) * half + m["stash_rows"]
    measured_layer = m["saved"] + own_tokens + m["stash_rows"]
    # vision, logits, engine work: the measured peak less the parts counted (and less the CPU's
    # attention probabilities, which a GPU's FlashAttention never stores)
    counted = measured_layer + m.get("saved_scores", 0) + m["stash_other"]
    # the engine's copy of the gradients it found (fp32, reweight by stash): the size of the
    # trainable parameters at the full depth, not of the batch; the correction way keeps none
    copy = trainable * 4 if m.get("keeps_grad_copy") else 0
    rest = max(0.0, m["peak"] - counted - m.get("grad_copy", 0)) * half
    if m.get("ckpt_held") is not None:
        # checkpointing: every layer keeps its input (the checkpoint) and the hooked layers'
        # inputs the engine holds until their gradients arrive; one layer's activations are
        # recomputed at a time (a one-off term, in "other")
        per_layer = m["ckpt_held"] * half + m["stash_rows"]
        rest += m["saved"] * half
    clones = m.get("clones_per_layer", 0) * layers + m.get("clones_other", 0)
    layer_part = per_layer * layers * (1 if m.get("per_sample") else scale)
    steady = m["stash_other"] + rest if m.get("per_sample") else (m["stash_other"] + rest) * scale
    total = weights + state + layer_part + steady + clones + copy
    return {
        "weights_gb": weights / GB,
        "trainable_state_gb": state / GB,
        "layers_gb": layer_part / GB,
        "other_gb": (steady + clones + copy) / GB,
        "total_gb": total / GB,
    }


# where an allocation happened, from its Python stack (innermost frame first): the first rule
# whose text is in a frame's name names the part (nn.Module frames name their class)
PART_RULES = (
    ("aimkp/engine/", "engine"),
    ("lm_loss.py", "LM head + loss"),
    ("Vision", "vision tower"),
    ("CLIP", "vision tower"),
    ("Siglip", "vision tower"),
    ("Projector", "projector"),
    ("PatchMerger", "projector"),
    ("Connector", "projector"),
    ("DecoderLayer", "decoder layers"),
    ("nn.Module: Linear", "decoder layers"),  # a LoRA linear outside a layer: the head
    ("aimkp/ops/", "embedding op"),
    ("aimkp/models/forward.py", "row forward (gathers, eager head + loss)"),
    ("aimkp/method/", "method (rows, losses, filter, reweight)"),
)


def _part_of(event: Any) -> str:
    """The part of the program an allocation belongs to (:data:`PART_RULES`); allocations of
    autograd's C++ engine carry no Python frame: ``backward (autograd)``."""
    node = event.parent
    while node is not None:
        name = node.name
        for text, part in PART_RULES:
            if text in name:
                return part
        if name.startswith("autograd::engine::evaluate_function"):
            return "backward (autograd)"  # its Python parents are the caller of .backward()
        node = node.parent
    return "other"


def profiled_peak(fn: Any) -> dict[str, Any]:
    """Run ``fn`` under the torch profiler (CPU memory) and measure what it allocates, as CUDA's
    allocator counts it: starting from 0 at the call, every allocation adds, every free
    subtracts (also of a tensor allocated before the call: it makes room).

    Returns ``peak`` (bytes: the most allocated at once; the weights and other tensors that were
    live before the call are not in it: the plan counts them apart), ``parts`` (bytes live at the
    peak by where they were allocated, :data:`PART_RULES`), ``part_peaks`` (per part the most
    allocated at once while that part allocated: a part whose transient is freed before the peak,
    as a vision tower's, shows there), ``peak_at`` (the part whose allocation set the peak) and
    ``freed_earlier`` (bytes of tensors from before the call that it freed).

    (benchmarks/common.py's ``peak_memory_mb`` reads the profiler's memory timeline, which also
    counts every tensor from before the call that the call used: the weights it read.)
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        fn()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.tag == _EventType.Allocation and ev.typed[1].device.type == "cpu":
            allocs.append(ev)
    allocs.sort(key=lambda ev: ev.start_time_ns)
    live: dict[int, tuple[int, str]] = {}  # ptr -> (bytes, part)
    cur = freed_earlier = 0
    best: dict[str, Any] = {"peak": 0, "live": {}, "peak_at": ""}
    part_peaks: dict[str, int] = {}
    for ev in allocs:
        f = ev.typed[1]
        if f.alloc_size > 0:
            part = _part_of(ev)
            live[f.ptr] = (f.alloc_size, part)
            cur += f.alloc_size
            part_peaks[part] = max(part_peaks.get(part, 0), cur)
            if cur > best["peak"]:
                best = {"peak": cur, "live": dict(live), "peak_at": part}
        else:
            cur += f.alloc_size
            if live.pop(f.ptr, None) is None:
                freed_earlier -= f.alloc_size
    parts: dict[str, int] = {}
    for nbytes, part in best.pop("live").values():
        parts[part] = parts.get(part, 0) + nbytes
    return {**best, "parts": parts, "part_peaks": part_peaks, "freed_earlier": freed_earlier}


def step_peak(fn: Any, device: str) -> dict[str, Any]:
    """:func:`profiled_peak` on the CPU; on CUDA the allocator's peak above what was live before
    (no parts: the allocator's counters say how much, not where)."""
    if torch.device(device).type != "cuda":
        return profiled_peak(fn)
    from benchmarks.common import peak_memory_mb

    return {"peak": peak_memory_mb(fn, device) * 2**20, "parts": {}, "part_peaks": {}}


def lm_head_peaks(shape: str, tokens: int, device: str = "cpu") -> dict[str, float]:
    """Bytes allocated at once by the LM head + per-token loss, forward and backward, at the
    shape's hidden size and vocabulary and ``tokens`` answer tokens (fp32, frozen head, the
    hidden states trainable), on ``device`` (:func:`step_peak`): the eager head against
    :mod:`aimkp.models.lm_loss`'s chunks."""
    from aimkp.models.lm_loss import eager_lm_loss, row_answer_losses

    text = TEXT_CONFIGS[shape](1)
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device).requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g, device=device).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    rows = torch.arange(tokens, device=device) // max(1, tokens // 24)

    def run() -> None:
        loss = row_answer_losses(head, h, targets, rows, int(rows.max()) + 1)
        loss.sum().backward()
        h.grad = None

    chunked = step_peak(run, device)["peak"]
    with eager_lm_loss():
        eager = step_peak(run, device)["peak"]
    return {"lm_head_tokens": tokens, "lm_head_eager": eager, "lm_head_chunked": chunked}


def _build(args: argparse.Namespace) -> tuple[Any, list, list[str]]:
    from aimkp.data import load_dataset
    from aimkp.models.lora import apply_lora
    from aimkp.models.shapes import build_shaped

    recs = [r for r in load_dataset("default", "train") if r.image_path or r.image][: args.samples]
    texts = [r.text for r in recs] + [", ".join(r.keyphrases) for r in recs]
    torch.manual_seed(0)
    loaded = build_shaped(args.shape, layers=1, vision_layers=1, texts=texts, device=args.device)
    apply_lora(loaded, r=128, alpha=256, dropout=0.0)
    if args.device != "cpu":  # as a 7B LoRA run on CUDA: frozen base bf16, trainable fp32
        from aimkp.models.precision import cast_frozen_base

        cast_frozen_base(loaded, torch.bfloat16)
    from aimkp.models.attention import apply_attention, resolve_attention

    # packed rows as on the GPU (there: torch's varlen kernel; here: the per-row reference)
    apply_attention(loaded.model, resolve_attention(args.attn, args.device))
    loaded.model.train()
    samples = [loaded.adapter.encode(r) for r in recs]
    return loaded, samples, texts


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One AimKP step per reweight storage and one reference step; measured bytes per row."""
    from aimkp.method.options import StepOptions
    from aimkp.method.pmm import StrideTable
    from aimkp.method.reference import reference_step
    from aimkp.method.step import aimkp_step

    loaded, samples, _ = _build(args)
    model = loaded.model
    layer = loaded.adapter.language_model.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    split = param_split(model, layer, first_block(loaded.adapter.vision_tower))
    shape = SHAPES[args.shape]
    idx = list(range(len(samples)))
    n_total = float(sum(s.n_answer_tokens for s in samples))
    table = StrideTable(len(samples))
    table.text[:] = 2
    table.image[:] = 2
    train = [p for p in model.parameters() if p.requires_grad]
    amp_dtype = torch.bfloat16 if args.device != "cpu" else None
    opts = StepOptions(update_strides=False, device=args.device, amp_dtype=amp_dtype)
    rows: list[dict[str, Any]] = []

    def zero(storage: str | None) -> None:
        # before the measured call: the trainable parameters' gradients are in the plan's
        # LoRA state, so the engine's steps start with them allocated (zeros: the step adds to
        # them in place) and the peak holds only what the step itself needs; the reference
        # starts without them (its gradient clones are subtracted below, the accumulator with
        # them)
        for p in train:
            p.grad = torch.zeros_like(p) if storage is not None else None

    def step(storage: str | None) -> dict[str, Any]:
        counts: list = []
        saved: dict[str, Any] = {}
        res: dict[str, Any] = {}

        def run() -> None:
            with saved_in_layer(layer, params) as s:
                saved_ptrs = s["ptrs"]
                if storage is None:
                    res["r"] = reference_step(loaded, samples, idx, table, n_total, opts)[0]
                else:
                    with engine_storage(storage, counts, saved_ptrs):
                        res["r"] = aimkp_step(loaded, samples, idx, table, n_total, opts)
            saved.update({k: v for k, v in s.items() if k != "ptrs"})

        t0 = time.perf_counter()
        zero(storage)
        measured = step_peak(run, args.device)
        c = counts[-1] if counts else None
        return {
            "storage": storage or "reference",
            "samples": len(samples),
            "rows": res["r"].n_rows,
            "input_tokens": res["r"].n_input_tokens,
            "peak": measured["peak"],
            "freed_earlier": measured.get("freed_earlier", 0),
            "parts": measured["parts"],
            "part_peaks": measured["part_peaks"],
            "peak_at": measured.get("peak_at", ""),
            "saved": saved.get("bytes", 0),
            "saved_scores": saved.get("scores", 0),
            "stash_tokens": c.layer_tokens if c else 0,
            "stash_rows": c.layer_rows if c else 0,
            "stash_shared": c.layer_shared if c else 0,
            "stash_other": c.other if c else 0,
            "stash_counted": c is not None or storage is None,
            "seconds": time.perf_counter() - t0,
            "params": split,
            # the gradients the engine found (allocated by zero()) and copied for the reweight
            **grad_copy(split, storage),
            "act_bytes": opts.element_size,
            "shape": args.shape,
            "layers_full": shape.layers,
            "vision_layers_full": shape.vision_layers,
        }

    for storage in args.storages:
        rows.append(step(storage))
        print(f"  measured {storage}: {rows[-1]['seconds']:.0f} s", flush=True)
    auto = next((r for r in rows if r["storage"] == "auto"), None)
    if args.checkpointing and auto is not None:
        # under non-reentrant checkpointing autograd's saved tensors inside the layer are the
        # checkpoint's (not seen by the outer hooks); what the layer holds is measured as the
        # peak minus the parts measured without it (vision, logits, engine work: "rest")
        from aimkp.models.precision import enable_gradient_checkpointing

        enable_gradient_checkpointing(loaded)
        r = step("auto")
        r["storage"] = "auto+ckpt"
        # extrapolated from counted parts (a 1-layer peak cannot show what checkpointing saves
        # across layers): the layer input (hidden size per token) and the engine's held inputs
        # (the tokens stash's storages shared with autograd's saved activations)
        tokens = next((x for x in rows if x["storage"] == "tokens"), None)
        hidden = loaded.adapter.language_model.config.hidden_size
        r["ckpt_held"] = r["input_tokens"] * hidden * r["act_bytes"] + (
            tokens["stash_shared"] if tokens else 0
        )
        r["saved"], r["saved_scores"] = auto["saved"], auto["saved_scores"]
        rows.append(r)
        print(f"  measured auto with checkpointing: {r['seconds']:.0f} s", flush=True)
        model.gradient_checkpointing_disable()
    if not args.no_reference:
        r = step(None)
        # the reference clones every trainable gradient once per copy (3 per sample) and keeps
        # an accumulator: counted from the parameter split, at the measured layer count
        r["per_sample"] = True
        r["clones_per_layer"] = split["train_layer"] * 4 * 4  # 3 copies + accumulator, fp32
        r["clones_other"] = split["train_other"] * 4 * 4
        measured_clones = r["clones_per_layer"] + r["clones_other"]
        r["peak"] = max(0.0, r["peak"] - measured_clones)
        r["saved"] /= len(samples)  # one sample at a time: its own activations
        r["saved_scores"] /= len(samples)
        rows.append(r)
        print(f"  measured reference: {r['seconds']:.0f} s", flush=True)
    return rows


def grad_copy(split: dict[str, int], storage: str | None) -> dict[str, Any]:
    """The engine steps start with the gradients allocated and the engine (reweight by stash)
    copies them: measured bytes at one layer, and that the full-depth plan keeps such a copy."""
    if storage is None:
        return {"grad_copy": 0, "keeps_grad_copy": False}
    return {"grad_copy": (split["train_layer"] + split["train_other"]) * 4, "keeps_grad_copy": True}


PARAM_KEYS = ("frozen_layer", "frozen_other", "train_layer", "train_other", "frozen_vision_layer")


def rows_from_results(path: str) -> list[dict[str, Any]]:
    """The measured rows of a results file (``--from-results``): its parameter split put back
    under ``params``, the extrapolated columns and derived plans left out."""
    derived = ("_gb", "largest_batch_")
    rows = []
    for r in json.loads(pathlib.Path(path).read_text()):
        if r["storage"] in ("correction", "correction+ckpt"):
            continue
        m = {k: v for k, v in r.items() if k not in PARAM_KEYS and not k.endswith(derived[0])}
        m = {k: v for k, v in m.items() if not k.startswith(derived[1])}
        m["params"] = {k: r[k] for k in PARAM_KEYS if k in r}
        if "grad_copy" not in m:
            m.update(grad_copy(m["params"], None if r["storage"] == "reference" else "engine"))
        rows.append(m)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Print the measured table and the extrapolation; rows for the results files."""
    mb = 2**20
    print(
        f"\nMeasured: {SHAPES[args.shape].title} shapes, 1 decoder layer + 1 vision layer, "
        f"LoRA r=128, "
        f"{rows[0]['samples']} sample(s) ({rows[0]['rows']} rows, {rows[0]['input_tokens']} "
        f"kept tokens), {args.device}, fp32"
    )
    hdr = (
        f"{'storage':<10}{'peak MB':>10}{'saved/layer':>13}{'scores/layer':>14}"
        f"{'stash/layer':>13}{'shared':>8}{'stash other':>13}"
    )
    print(hdr)
    for r in rows:
        stash = (r["stash_tokens"] + r["stash_rows"]) / mb
        print(
            f"{r['storage']:<10}{r['peak'] / mb:>10.0f}{r['saved'] / mb:>13.0f}"
            f"{r.get('saved_scores', 0) / mb:>14.0f}{stash:>13.0f}"
            f"{r.get('stash_shared', 0) / mb:>8.0f}{r['stash_other'] / mb:>13.0f}"
        )
    print_parts(rows)
    print(
        "(MB = 2^20 bytes; saved: autograd's saved activations in the decoder layer, attention "
        "probabilities apart in scores (the CPU math kernel's; FlashAttention keeps none, so "
        "they are left out below); stash: what the engine keeps for the reweight, shared: of it, "
        "storages autograd also saved)"
    )
    print(
        f"\nExtrapolated: {' + '.join(map(str, full_depth(rows[0])))} decoder + vision layers, "
        f"B={args.batch} samples "
        f"({args.batch * rows[0]['rows'] // rows[0]['samples']} rows), bf16 (GB)"
    )
    cols = ["weights_gb", "trainable_state_gb", "layers_gb", "other_gb", "total_gb"]
    names = {"trainable_state_gb": "train state"}
    print(
        f"{'storage':<17}" + "".join(f"{names.get(c, c[:-3]):>12}" for c in cols)
        + "   fits 80 / 141 GB   largest B at 80 / 141 GB"
    )  # fmt: skip
    plans = list(rows)
    # the correction way (--reweight correction): provisional weights, then a forward + backward
    # over only the samples with a rejected copy; nothing kept for a reweight
    no_stash = {"stash_tokens": 0, "stash_rows": 0, "stash_other": 0, "stash_shared": 0,
                "keeps_grad_copy": False}  # fmt: skip
    base = next(r for r in rows if r["storage"] == "auto")
    plans.append({**base, **no_stash, "storage": "correction"})
    ckpt = next((r for r in rows if r["storage"] == "auto+ckpt"), None)
    if ckpt is not None:
        plans.append({**ckpt, **no_stash, "storage": "correction+ckpt"})
    out = []
    for r in plans:
        e = extrapolate(r, *_at(r, args.batch))
        fits = " / ".join("yes" if e["total_gb"] <= g else "no" for g in DEVICE_GB)
        most = " / ".join(_batch_text(largest_batch(r, g)) for g in DEVICE_GB)
        print(
            f"{r['storage']:<17}" + "".join(f"{e[c]:>12.1f}" for c in cols)
            + f"   {fits:>16}   {most:>24}"
        )  # fmt: skip
        e["largest_batch_80gb"], e["largest_batch_141gb"] = (largest_batch(r, g) for g in DEVICE_GB)
        out.append({**{k: v for k, v in r.items() if k != "params"}, **r["params"], **e})
    print(
        "(correction: no stash; its extra cost is a forward + backward over the samples with a "
        "rejected copy, i.e. that fraction of a step in time. ckpt rows: extrapolated from "
        "counted parts, see extrapolate())"
    )
    print(f"--reweight auto at 80 / 141 GB: {' / '.join(auto_choices(base, args.batch))}")
    return out


def print_parts(rows: list[dict[str, Any]]) -> None:
    """What is live at each measured step's peak, by part (MiB), and each part's own peak."""
    mb = 2**20
    if not any(r.get("parts") for r in rows):
        return
    print("\nLive at the peak, by where it was allocated (MiB; in parentheses: the most allocated "
          "at once while that part allocated)")  # fmt: skip
    for r in rows:
        parts = r.get("parts", {})
        cells = [
            f"{n}: {parts[n] / mb:.0f} ({r['part_peaks'].get(n, 0) / mb:.0f})"
            for n in sorted(parts, key=lambda n: -parts[n])
            if parts[n] >= mb or r["part_peaks"].get(n, 0) >= r["peak"] - mb
        ]
        print(f"  {r['storage']:<10} peak at {r.get('peak_at', '')}; " + ", ".join(cells))


def auto_choices(m: dict[str, Any], batch: int) -> list[str]:
    """What ``--reweight auto`` picks on each of :data:`DEVICE_GB` for the extrapolated full-depth
    step (``m``: a measured row, see :func:`extrapolate`): its rule
    (``aimkp.method.correction.auto_way``) on the stash (bf16 tokens, fp32 per-row gradients)
    against the memory left by the weights and the LoRA state."""
    from aimkp.method.correction import auto_way

    e = extrapolate(m, *_at(m, batch))
    half = 2 / m.get("act_bytes", 4)
    per_layer = m["stash_tokens"] * half + m["stash_rows"]
    stash = (per_layer * full_depth(m)[0] + m["stash_other"]) * batch / m["samples"]
    fixed = (e["weights_gb"] + e["trainable_state_gb"]) * GB
    return [auto_way(stash, g * GB - fixed) for g in DEVICE_GB]


MAX_BATCH = 256


def largest_batch(m: dict[str, Any], gb: float) -> int:
    """The most samples per micro-batch (up to 256) whose extrapolated full-depth step fits
    ``gb`` (the reference runs one sample at a time: any batch that fits once)."""
    b = 0
    while b < MAX_BATCH and extrapolate(m, *_at(m, b + 1))["total_gb"] <= gb:
        b += 1
    return b


def _batch_text(b: int) -> str:
    return "any" if b == MAX_BATCH else str(b)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=1, help="samples measured (3 rows each)")
    ap.add_argument("--batch", type=int, default=8, help="samples of the extrapolated step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--storages", nargs="+", choices=STORAGES, default=list(STORAGES))
    ap.add_argument("--attn", choices=["varlen", "sdpa"], default="varlen", help="row layout")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument(
        "--no-checkpointing", dest="checkpointing", action="store_false",
        help="skip the auto storage run with gradient checkpointing",
    )  # fmt: skip
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llava7b", help="model shape")
    ap.add_argument(
        "--lm-head-tokens", type=int, default=768,
        help="answer tokens of the LM head's own measurement (0: none; default 8 samples x 3 "
        "rows x 32 tokens)",
    )  # fmt: skip
    ap.add_argument(
        "--from-results", metavar="JSON",
        help="extrapolate the measured rows of a results file again (no measuring)",
    )  # fmt: skip
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    from benchmarks.common import env_info, write_results

    t0 = time.perf_counter()
    if args.from_results:
        measured = rows_from_results(args.from_results)
        args.shape = measured[0]["shape"]
        rows = report(measured, args)
    else:
        rows = report(measure(args), args)
    if args.lm_head_tokens and not args.from_results:
        gc.collect()  # the measured model is gone: the head's own weight takes its place
        head = lm_head_peaks(args.shape, args.lm_head_tokens, args.device)
        print(
            f"\nLM head + loss at {head['lm_head_tokens']} answer tokens, forward + backward, "
            f"fp32, {args.device}: eager {head['lm_head_eager'] / 2**20:.0f} MiB, chunked "
            f"(frozen head, aimkp.models.lm_loss) {head['lm_head_chunked'] / 2**20:.0f} MiB"
        )
        rows = [{**r, **head} for r in rows]
    print(f"\n{time.perf_counter() - t0:.0f} s on {env_info(args.device)['device']}")
    if not args.no_write:
        env = env_info(args.device)
        for p in write_results(f"memory_plan-{args.shape}", [{**env, **r} for r in rows]):
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
