"""``aimkp export`` writes the adapter's ``transformers`` processor: ``AutoProcessor`` loads it
as that class, with the saved tokenizer and image processor, and its output for an image prompt
is exactly what aimkp encodes, so the exported model runs on it; where no processor can be built
the export keeps its tokenizer / image processor files and still loads."""

from __future__ import annotations

import logging

import pytest
import torch

from aimkp.cli import main
from aimkp.models import load_model, save_checkpoint
from aimkp.models.adapter import QUESTION, MLLMAdapter
from aimkp.models.checkpoint import PROCESSOR_CONFIG
from tests.helpers.models import (
    records,
    tiny,
)

PRESETS = ["tiny-llava", "tiny-idefics3", "tiny-qwen2vl", "tiny-qwen25vl"]


def _export(name: str, tmp_path, **tiny_kw):
    """(LoRA LoadedModel of ``name``, the directory ``aimkp export`` wrote from its checkpoint)."""
    loaded = tiny(name, **tiny_kw)
    loaded.model.eval()
    save_checkpoint(tmp_path / "best", loaded, base_dir=tmp_path / "base")
    out = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(tmp_path / "best"), "--output", str(out)]) == 0
    return loaded, out


def _image_prompt(processor, loaded, text: str) -> str:
    """The AimKP prompt with one image, as a user of the exported processor writes it."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}, {"type": "text", "text": text + "\n" + QUESTION}]
        msgs = [{"role": "user", "content": content}]
        return processor.apply_chat_template(msgs, add_generation_prompt=True)
    # no template (tiny-llava): this tokenizer adds no bos on its own, aimkp writes it
    return loaded.tokenizer.bos_token + loaded.adapter.image_marker + text + "\n" + QUESTION


@pytest.mark.parametrize("name", PRESETS)
def test_auto_processor_of_export_is_the_adapters_and_feeds_the_model(name, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if name.startswith("tiny-qwen"):
        pytest.importorskip("torchvision")  # Qwen2-VL processors need its video processor
    loaded, out = _export(name, tmp_path)
    assert (out / PROCESSOR_CONFIG).is_file()
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert type(processor) is loaded.adapter.processor_class
    assert processor.chat_template == loaded.tokenizer.chat_template

    rec = records()[0]
    want_ids = loaded.tokenizer(rec.text)["input_ids"]
    assert processor.tokenizer(rec.text)["input_ids"] == want_ids
    want_pv = loaded.image_processor(images=rec.image, return_tensors="pt")["pixel_values"]
    got_pv = processor.image_processor(images=rec.image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(torch.as_tensor(got_pv), torch.as_tensor(want_pv), rtol=0, atol=0)

    # the processor expands the image to the tokens aimkp encodes (LLaVA: image_seq_length)
    sample = loaded.adapter.encode(rec, with_answer=False)
    inputs = processor(
        text=_image_prompt(processor, loaded, rec.text), images=rec.image, return_tensors="pt"
    )
    assert inputs["input_ids"][0].tolist() == sample.input_ids.tolist()
    n_image = int((inputs["input_ids"] == loaded.adapter.image_token_id).sum())
    assert n_image == sample.grid[0] * sample.grid[1]

    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(**inputs).logits
        kw = loaded.adapter.generation_kwargs([sample], sample.input_ids[None])
        want = loaded.model(input_ids=sample.input_ids[None], **kw).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    back = load_model(out)  # aimkp reads the export through its AutoProcessor
    assert back.tokenizer(rec.text)["input_ids"] == want_ids
    assert back.tokenizer.chat_template == loaded.tokenizer.chat_template
    assert back.image_processor.to_dict() == loaded.image_processor.to_dict()


def test_llava_processor_expands_image_to_the_configured_sequence_length(tmp_path):
    from transformers import AutoProcessor

    loaded, out = _export("tiny-llava", tmp_path)
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    rec = records()[0]
    inputs = processor(text="<image>", images=rec.image, return_tensors="pt")
    n_image = int((inputs["input_ids"] == loaded.adapter.image_token_id).sum())
    assert n_image == loaded.adapter.config.image_seq_length == 64


def test_processor_that_cannot_be_built_is_logged_and_export_still_loads(
    tmp_path, monkeypatch, caplog
):
    from transformers import AutoModelForImageTextToText

    def refuse(self):
        raise AttributeError("no video processor here")

    monkeypatch.setattr(MLLMAdapter, "build_processor", refuse)
    with caplog.at_level(logging.WARNING, logger="aimkp.models"):
        loaded, out = _export("tiny-llava", tmp_path)
    assert "no processor_config.json" in caplog.text and "no video processor" in caplog.text
    assert not (out / PROCESSOR_CONFIG).exists()
    assert (out / "preprocessor_config.json").is_file()
    AutoModelForImageTextToText.from_pretrained(out)
    back = load_model(out)  # the path of checkpoints written before processors were saved
    rec = records()[0]
    assert back.tokenizer(rec.text)["input_ids"] == loaded.tokenizer(rec.text)["input_ids"]
    assert type(back.image_processor) is type(loaded.image_processor)
