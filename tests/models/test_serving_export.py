"""``aimkp export --format vllm``: a tiny-llava LoRA checkpoint (projector trained as peft
``modules_to_save``) written as a base with the trained projector + a LoRA-only adapter under the
Hugging Face module names, loaded back with plain transformers + peft, and its greedy keyphrases
compared with ``aimkp predict`` on the same posts."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from aimkp.cli import main
from aimkp.eval.predict import parse_keyphrases
from aimkp.models import QUESTION, collate_rows, forward_rows, load_model, save_checkpoint
from tests.helpers.models import (
    records,
    tiny,
)

MAX_NEW = 12
STEPS = 30


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """tiny-llava with LoRA (r=8) and its projector trained for a few steps, saved as aimkp
    saves it: a peft adapter (projector in modules_to_save) beside a copy of its base."""
    loaded = tiny("tiny-llava")
    recs = [r for r in records() if r.id != "wide"]
    samples = [loaded.adapter.encode(r) for r in recs]
    keeps = [torch.ones(s.length, dtype=torch.bool) for s in samples]
    batch = collate_rows(loaded, samples, keeps, list(range(len(samples))))
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    n = float(sum(s.n_answer_tokens for s in samples))
    for _ in range(STEPS):  # until it recites some of its keyphrases: a non-vacuous comparison
        opt.zero_grad(set_to_none=True)
        (forward_rows(loaded, batch).loss_sum.sum() / n).backward()
        opt.step()
    loaded.model.eval()
    d = tmp_path_factory.mktemp("ckpt")
    ckpt = save_checkpoint(d / "ckpt", loaded)
    data = d / "posts"
    (data / "images").mkdir(parents=True)
    with (data / "test.jsonl").open("w") as f:
        for r in recs:
            obj = {"id": r.id, "text": r.text}  # unlabelled: posts to tag carry no keyphrases
            if r.image is not None:
                r.image.save(data / "images" / f"{r.id}.png")
                obj["image"] = f"images/{r.id}.png"
            f.write(json.dumps(obj) + "\n")
    return ckpt, data, recs


@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory):
    ckpt, _, _ = trained_checkpoint
    out = tmp_path_factory.mktemp("serve") / "serve"
    assert (
        main(["export", "--checkpoint", str(ckpt), "--output", str(out), "--format", "vllm"]) == 0
    )
    return out


def test_adapter_is_lora_only_under_hf_module_names(trained_checkpoint, exported):
    ckpt, _, _ = trained_checkpoint
    cfg = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert not cfg.get("modules_to_save")
    assert json.loads((ckpt / "adapter_config.json").read_text())["modules_to_save"]
    weights = load_file(exported / "adapter" / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    plain = LlavaForConditionalGeneration.from_pretrained(exported / "base")
    names = {n for n, _ in plain.named_modules()}
    prefix = "base_model.model."
    for key in weights:
        assert key.startswith(prefix)
        module = key[len(prefix) :].rsplit(".lora_", 1)[0]
        assert module in names and module.startswith("model.language_model."), key


def test_base_holds_the_trained_projector(trained_checkpoint, exported):
    ckpt, _, _ = trained_checkpoint
    served = LlavaForConditionalGeneration.from_pretrained(exported / "base").state_dict()
    initial = LlavaForConditionalGeneration.from_pretrained(ckpt / "base").state_dict()
    saved = load_file(ckpt / "adapter_model.safetensors")  # peft: projector in modules_to_save
    trained = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    proj = [k for k in served if ".multi_modal_projector." in k]
    assert proj
    for k in proj:
        assert torch.equal(served[k], trained[k]) and not torch.equal(served[k], initial[k])
    for k in served.keys() - set(proj):  # the rest is the initial base, LoRA not merged in
        assert torch.equal(served[k], initial[k]), k


def test_transformers_peft_greedy_equals_aimkp_predict(trained_checkpoint, exported, tmp_path):
    ckpt, data, recs = trained_checkpoint
    out = tmp_path / "pred.jsonl"
    argv = ["predict", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out)]
    assert main(argv + ["--max-new-tokens", str(MAX_NEW), "--device", "cpu"]) == 0
    want = {o["id"]: o["keyphrases"] for o in map(json.loads, out.read_text().splitlines())}
    assert set(want) == {r.id for r in recs}

    base = LlavaForConditionalGeneration.from_pretrained(exported / "base")
    model = PeftModel.from_pretrained(base, str(exported / "adapter")).eval()
    processor = AutoProcessor.from_pretrained(exported / "base")
    tok = processor.tokenizer
    aimkp_model = load_model(ckpt)
    for r in recs:
        prompt = ("<image>" if r.image is not None else "") + r.text + "\n" + QUESTION
        inputs = processor(text=prompt, images=r.image, return_tensors="pt")
        bos = torch.tensor([[tok.bos_token_id]])
        ids = torch.cat([bos, inputs["input_ids"]], dim=1)  # LLaVA's plain prompt starts <s>
        assert (
            ids[0].tolist() == aimkp_model.adapter.encode(r, with_answer=False).input_ids.tolist()
        )
        kw = {"pixel_values": inputs["pixel_values"]} if r.image is not None else {}
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                num_beams=1,
                pad_token_id=tok.pad_token_id,
                **kw,
            )
        text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        assert parse_keyphrases(text) == want[r.id], r.id
    assert any(want.values()), "nothing generated: the comparison would be vacuous"


def test_qwen2vl_base_plus_adapter_equals_the_checkpoint(tmp_path):
    """Qwen2-VL (projector = the merger): base + adapter, merged by peft, is the checkpoint's
    own merged model weight for weight."""
    from transformers import Qwen2VLForConditionalGeneration

    from aimkp.models.serving_export import export_for_serving

    loaded = tiny("tiny-qwen2vl")
    with torch.no_grad():  # a trained projector copy that differs from the original
        for name, p in loaded.model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05)
    ckpt = save_checkpoint(tmp_path / "ckpt", loaded)
    base, adapter = export_for_serving(ckpt, tmp_path / "serve")
    assert adapter is not None
    assert not json.loads((adapter / "adapter_config.json").read_text()).get("modules_to_save")
    served = PeftModel.from_pretrained(
        Qwen2VLForConditionalGeneration.from_pretrained(base), str(adapter)
    )
    got = served.merge_and_unload().state_dict()
    want = load_model(ckpt).model.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


def test_full_checkpoint_exports_a_base_only(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny("tiny-llava", lora=False))
    out = tmp_path / "serve"
    assert (
        main(["export", "--checkpoint", str(ckpt), "--output", str(out), "--format", "vllm"]) == 0
    )
    assert "full weights, no LoRA" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["base"]
    LlavaForConditionalGeneration.from_pretrained(out / "base")
    argv = ["export", "--checkpoint", str(ckpt), "--output", str(out), "--format", "vllm"]
    assert main([*argv, "--dtype", "bfloat16"]) == 2
    assert "--dtype applies to --format merged" in capsys.readouterr().err
