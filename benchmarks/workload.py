"""One AimKP step's inputs, built the same way for the breakdown and scaling benchmarks.

A :class:`Workload` is a model with LoRA, B encoded default-data samples visited at strides
text=2 / image=2 (every copy present: the step's most expensive state, strides not advanced
between repetitions) and everything ``aimkp_step`` / ``sft_step`` take. Sizes:

- ``tiny`` (CPU): the ``tiny-llava`` preset (Llama 128 x 2 layers, CLIP 64 x 2), fp32;
  ``image_px`` rebuilds it at another image size (``(image_px / 8) ** 2`` image tokens) by
  overriding the preset module's ``IMAGE_SIZE`` while it builds (a benchmark-only knob: the
  preset has no image-size argument);
- ``llava7b`` / ``qwen2vl7b`` (GPU): ``aimkp.models.shapes.build_shaped`` (LLaVA-1.5-7B /
  Qwen2-VL-7B shapes, few layers), frozen base in bf16 under bf16 autocast on CUDA.

``text_repeat`` repeats each record's text to lengthen the text part of every row.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch


@dataclasses.dataclass
class Workload:
    """Everything one AimKP / plain step needs (B samples, R rows)."""

    loaded: Any  # aimkp.models.LoadedModel
    samples: list  # B EncodedSample
    indices: list[int]  # [B] dataset indices (0..B-1)
    table: Any  # StrideTable at strides 2/2
    rows: list  # R Copy: originals + text + image copies
    n_total: float  # answer tokens of the originals
    device: str
    bf16: bool
    shape: str  # one line naming the model and sizes

    @property
    def options(self) -> Any:
        """The step's options (``aimkp.method.options.StepOptions``): strides not advanced,
        bf16 autocast when ``bf16``."""
        from aimkp.method.options import StepOptions

        amp_dtype = torch.bfloat16 if self.bf16 else None
        return StepOptions(update_strides=False, device=self.device, amp_dtype=amp_dtype)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.loaded.model.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


@contextlib.contextmanager
def _preset_image_size(px: int | None) -> Iterator[None]:
    from aimkp.models import presets

    old = presets.IMAGE_SIZE
    presets.IMAGE_SIZE = px or old
    try:
        yield
    finally:
        presets.IMAGE_SIZE = old


def _records(batch_size: int, text_repeat: int) -> list:
    from aimkp.data import load_dataset

    recs = list(load_dataset("default", "train"))[:batch_size]
    if text_repeat > 1:
        recs = [dataclasses.replace(r, text=" ".join([r.text] * text_repeat)) for r in recs]
    return recs


def build_workload(
    size: str = "tiny",
    *,
    device: str = "cpu",
    batch_size: int = 4,
    lora_rank: int = 16,
    text_repeat: int = 1,
    image_px: int | None = None,
    layers: int = 2,
    vision_layers: int = 2,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Workload:
    """Build the model (seed 0), LoRA ``lora_rank`` (alpha 2r), the encoded samples and rows.
    ``overrides``: config fields of a 7B shape replaced (``aimkp.models.shapes``; tests)."""
    from aimkp.method.pmm import StrideTable
    from aimkp.method.step import build_rows
    from aimkp.models import load_model
    from aimkp.models.lora import apply_lora
    from aimkp.models.precision import cast_frozen_base
    from aimkp.models.shapes import SHAPES, build_shaped

    recs = _records(batch_size, text_repeat)
    texts = [r.text for r in recs] + [", ".join(r.keyphrases) for r in recs]
    torch.manual_seed(0)
    if size == "tiny":
        with _preset_image_size(image_px):
            loaded = load_model("tiny-llava", train_texts=texts, device=device, seed=0)
        bf16 = False
        shape = f"tiny-llava (Llama 128x2, CLIP 64x2, {image_px or 64}px), LoRA r={lora_rank}, fp32"
    elif size in SHAPES:
        loaded = build_shaped(
            size, layers=layers, vision_layers=vision_layers, texts=texts, device=device,
            image_px=image_px, overrides=overrides,
        )  # fmt: skip
        bf16 = True
        shape = None  # named below, once the image tokens are known
    else:
        raise ValueError(f"unknown workload size {size!r} (tiny, {', '.join(SHAPES)})")
    apply_lora(loaded, r=lora_rank, alpha=2 * lora_rank, dropout=0.0)
    if size in SHAPES and device.startswith("cuda"):
        cast_frozen_base(loaded, torch.bfloat16)
    loaded.model.train()
    samples = [loaded.adapter.encode(r) for r in recs]
    if shape is None:
        shape = SHAPES[size].describe(layers, vision_layers, image_tokens(samples[0]))
        base = "frozen base bf16" if device.startswith("cuda") else "fp32"
        shape += f", LoRA r={lora_rank} (fp32), {base}"
    table = StrideTable(len(samples))
    table.text[:] = 2
    table.image[:] = 2
    indices = list(range(len(samples)))
    return Workload(
        loaded=loaded,
        samples=samples,
        indices=indices,
        table=table,
        rows=build_rows(samples, indices, table),
        n_total=float(sum(s.n_answer_tokens for s in samples)),
        device=device,
        bf16=bf16,
        shape=shape,
    )


def run_aimkp(w: Workload) -> Any:
    """One AimKP micro-step (``aimkp_step``, strides not advanced); returns its StepResult."""
    from aimkp.method.step import aimkp_step

    w.zero_grad()
    return aimkp_step(w.loaded, w.samples, w.indices, w.table, w.n_total, w.options)


def run_token_floor(w: Workload) -> int:
    """The AimKP step's token floor: a plain forward + backward (no engine, no filter) over the
    same rows, collated the same way (``plan_rows``); returns the kept tokens it fed."""
    from aimkp.method.step import forward_backward, plan_rows, weighted_sum

    w.zero_grad()
    plan = plan_rows(w.loaded, w.samples, w.rows, w.n_total, w.options)
    forward_backward(w.loaded, plan.batch, weighted_sum(plan.w0), w.options)
    return plan.n_input_tokens


def run_sft(w: Workload) -> Any:
    """One plain fine-tuning micro-step on the B originals (``sft_step``)."""
    from aimkp.method.step import sft_step

    w.zero_grad()
    return sft_step(w.loaded, w.samples, w.n_total, w.options)


def image_tokens(sample: Any) -> int:
    """Image-placeholder tokens of one encoded sample (0 without an image)."""
    span = sample.image_span
    return 0 if span is None else int(span[1] - span[0])


def step_facts(w: Workload) -> dict[str, Any]:
    """What one AimKP step at this workload ran: dtype, rows, kept tokens, the backends."""
    result = run_aimkp(w)
    ran = result.ran
    return {
        "dtype": "bf16 autocast" if w.bf16 and w.device.startswith("cuda") else "float32",
        "batch_samples": len(w.samples),
        "rows": result.n_rows,
        "input_tokens": result.n_input_tokens,
        "engine_backend": result.engine_backend,
        "embedding_backend": ran.embedding_backend,
        "attention": ran.attention,
        "row_layout": ran.layout,
    }
