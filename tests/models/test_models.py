"""Presets, tokenizers, adapters' encoding, LoRA set-up and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from aimkp.models import (
    QUESTION,
    collate_rows,
    forward_rows,
    get_adapter,
    load_model,
    save_checkpoint,
)
from aimkp.models.checkpoint import merged_state_dict
from aimkp.models.lora import apply_lora, language_linear_names
from tests.helpers.models import (
    TEXTS,
    Record,
    records,
    tiny,
)

PRESETS = ["tiny-llava", "tiny-qwen2vl"]


@pytest.mark.parametrize("name", [*PRESETS, "tiny-qwen25vl"])
def test_encode_spans_labels_and_answer(name):
    loaded = tiny(name, lora=False)
    tok, adapter = loaded.tokenizer, loaded.adapter
    for rec in records():
        s = adapter.encode(rec)
        ids = s.input_ids
        a, b = s.text_span
        assert tok.decode(ids[a:b]) == rec.text
        if rec.image is None:
            assert s.image_span is None and s.grid is None and s.pixel_values is None
            assert adapter.image_token_id not in ids.tolist()
        else:
            i0, i1 = s.image_span
            assert i1 - i0 == s.grid[0] * s.grid[1]
            assert (ids[i0:i1] == adapter.image_token_id).all()
            assert int((ids == adapter.image_token_id).sum()) == i1 - i0
            assert i1 <= a  # image before text, as in the AimKP prompt
        ans = s.labels != -100
        assert int(ans.sum()) == s.n_answer_tokens == s.length - s.prompt_len
        assert torch.equal(s.labels[ans], ids[ans])
        assert int(ids[-1]) == tok.eos_token_id
        assert tok.decode(ids[s.prompt_len : -1]) == ", ".join(rec.keyphrases)
        assert QUESTION in tok.decode(ids[b : s.prompt_len])
        assert s.position_ids.shape[-1] == s.length
        p = adapter.encode(rec, with_answer=False)
        assert torch.equal(p.input_ids, ids[: s.prompt_len]) and p.n_answer_tokens == 0


def test_preset_grids_and_templates():
    llava = tiny("tiny-llava", lora=False)
    s = llava.adapter.encode(records()[0])
    assert s.grid == (8, 8) and s.pixel_values.shape == (1, 3, 64, 64)
    assert torch.equal(s.position_ids, torch.arange(s.length))
    assert s.input_ids[0] == llava.tokenizer.bos_token_id
    qwen = tiny("tiny-qwen2vl", lora=False)
    recs = records()
    s = qwen.adapter.encode(recs[0])
    assert s.grid == (4, 4) and s.image_grid_thw.tolist() == [[1, 8, 8]]
    assert qwen.adapter.encode(recs[3]).grid == (4, 5)  # 50 x 70 keeps its aspect
    text = qwen.tokenizer.decode(s.input_ids[: s.prompt_len])
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    i0, i1 = s.image_span
    cfg = qwen.adapter.config
    assert s.input_ids[i0 - 1] == cfg.vision_start_token_id
    assert s.input_ids[i1] == cfg.vision_end_token_id
    assert s.position_ids.shape == (3, s.length)


@pytest.mark.parametrize("name", PRESETS)
def test_tokenizer_special_tokens(name):
    tok = tiny(name, lora=False).tokenizer
    assert 500 <= len(tok) <= 5000
    specials = ["<image>"] if name == "tiny-llava" else ["<|image_pad|>", "<|vision_start|>"]
    for sp in specials:
        ids = tok(f"a {sp} b", add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids(sp) in ids
    assert tok.decode(tok("Wildflower hour, #spring!")["input_ids"], skip_special_tokens=True) == (
        "Wildflower hour, #spring!"
    )


@pytest.mark.parametrize("name", PRESETS)
def test_lora_targets_and_trainable_set(name):
    loaded = tiny(name, lora=False)
    base = loaded.model
    names = language_linear_names(base)
    assert len(names) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    apply_lora(loaded, r=4, alpha=8)
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    adapter = loaded.adapter
    proj = {id(p) for p in adapter.projector.parameters()}
    for n, p in loaded.model.named_parameters():
        if id(p) in proj:  # peft's modules_to_save: a trained copy beside the frozen original
            assert p.requires_grad == (".modules_to_save.default." in n), n
        elif p.requires_grad:
            assert "lora_" in n and "language_model" in n, n
    assert sum("lora_A" in n for n in trainable) == len(names)
    assert not any(p.requires_grad for p in adapter.vision_tower.parameters() if id(p) not in proj)
    assert not adapter.lm_head.weight.requires_grad

    full = tiny(name, lora=False)
    apply_lora(full, full=True, train_projector=True)
    assert all(p.requires_grad for p in full.adapter.language_model.parameters())
    assert full.adapter.lm_head.weight.requires_grad
    vt = [
        p
        for p in full.adapter.vision_tower.parameters()
        if id(p) not in {id(q) for q in full.adapter.projector.parameters()}
    ]
    assert not any(p.requires_grad for p in vt)


def test_merged_state_dict_equals_peft_merge():
    loaded = tiny("tiny-llava")
    merged = merged_state_dict(loaded.model)
    ref = copy.deepcopy(loaded.model).merge_and_unload().state_dict()
    assert set(merged) == set(ref)
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k], rtol=1e-6, atol=1e-7)
    assert any(".base_layer." in k for k in loaded.model.state_dict())  # still wrapped


def test_qwen_checkpoint_round_trip(tmp_path):
    loaded = tiny("tiny-qwen2vl")
    samples = [loaded.adapter.encode(r) for r in records()]
    keeps = [torch.ones(s.length, dtype=torch.bool) for s in samples]
    rows = list(range(len(samples)))
    with torch.no_grad():
        want = forward_rows(loaded, collate_rows(loaded, samples, keeps, rows)).loss_sum
    save_checkpoint(tmp_path, loaded)
    back = load_model(tmp_path, attn="eager")
    assert back.preset == "tiny-qwen2vl" and back.adapter.attn_implementation == "eager"
    s2 = [back.adapter.encode(r) for r in records()]
    for a, b in zip(samples, s2):
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.position_ids, b.position_ids)
    with torch.no_grad():
        got = forward_rows(back, collate_rows(back, s2, keeps, rows)).loss_sum
    # merged weights in fp32: W + s * B A rounds once; eager vs sdpa reorders the softmax
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_plain_hf_directory_loads(tmp_path):
    loaded = tiny("tiny-llava", lora=False)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    loaded.image_processor.save_pretrained(tmp_path)
    back = load_model(tmp_path)
    assert back.preset is None and back.info["aimkp"] is None
    rec = records()[0]
    assert torch.equal(back.adapter.encode(rec).input_ids, loaded.adapter.encode(rec).input_ids)


def test_load_model_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        load_model("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ValueError, match="neither a preset"):
        load_model("tiny-nothing")
    with pytest.raises(ValueError, match="attn"):
        load_model("tiny-llava", attn="flex")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="flash-attn"):
            load_model("tiny-llava", attn="flash")
    with pytest.raises(ValueError, match="no aimkp adapter"):
        get_adapter(_FakeModel())


class _FakeModel(torch.nn.Module):
    class config:  # noqa: N801 - mimics a HF config object
        model_type = "mamba"


def test_preset_build_is_deterministic_and_uses_given_texts():
    from aimkp.models.presets import build_preset

    m1, t1, _ = build_preset("tiny-llava", TEXTS, seed=3)
    m2, t2, _ = build_preset("tiny-llava", TEXTS, seed=3)
    assert t1.get_vocab() == t2.get_vocab()
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="unknown preset"):
        build_preset("tiny-idefics")


# The chat template llava-hf ships for LLaVA-1.5 (structured content only: images first).
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_llava_hf_chat_template():
    loaded = tiny("tiny-llava", lora=False)
    tok = copy.deepcopy(loaded.tokenizer)
    tok.chat_template = LLAVA_HF_TEMPLATE
    adapter = get_adapter(loaded.model, tok, loaded.image_processor)
    rec = records()[0]
    s = adapter.encode(rec)
    i0, i1 = s.image_span
    a, b = s.text_span
    assert tok.decode(s.input_ids[:i0]) == "<s>USER: "
    assert (s.input_ids[i0:i1] == adapter.image_token_id).all() and i1 - i0 == 64
    assert tok.decode(s.input_ids[a:b]) == rec.text
    prompt = tok.decode(s.input_ids[b : s.prompt_len])
    assert prompt == f"\n{QUESTION} ASSISTANT:"
    assert tok.decode(s.input_ids[s.prompt_len :]) == " " + ", ".join(rec.keyphrases) + "</s>"
    text_only = adapter.encode(records()[1])
    assert text_only.image_span is None
    assert tok.decode(text_only.input_ids[: text_only.text_span[0]]) == "<s>USER: "


def test_encode_and_lora_errors():
    loaded = tiny("tiny-llava")
    with pytest.raises(ValueError, match="'nokp': no keyphrases"):
        loaded.adapter.encode(Record("nokp", "some text", []))
    assert loaded.adapter.encode(Record("nokp", "some text", []), with_answer=False).length > 0
    with pytest.raises(ValueError, match="'long': the post is .* over the model's context"):
        loaded.adapter.encode(Record("long", "word " * 1100, ["x"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(loaded)
