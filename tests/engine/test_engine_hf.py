"""Per-sample gradient engine on tiny Hugging Face multimodal models built offline from configs:
LLaVA (CLIP + Llama) and Qwen2-VL, peft LoRA on every linear layer of the language model, the
multimodal projector trainable (plus, for LLaVA, the final RMSNorm and the token embedding), padded
rows and packed rows (one ``[1, total_T]`` sequence with a 4-D block-diagonal causal mask).

Reference: the loop of one backward per row on the same forward graph. fp32, relative error <= 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aimkp
from tests.helpers.engine import assert_close_rel, check_against_loop, flat_grads

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
V = 64


def _lora(model: torch.nn.Module, trainable: tuple[str, ...]) -> torch.nn.Module:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LM_TARGETS)
    model = peft.get_peft_model(model, cfg)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or any(t in n for t in trainable))
        if "lora_B" in n:  # nonzero B so lora_A gets a gradient
            torch.nn.init.normal_(p, std=0.2)
    return model


def tiny_llava() -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    vc = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14, projection_dim=16,
    )  # fmt: skip
    tc = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vc, text_config=tc, image_token_id=V - 1, image_seq_length=4,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    m = Llava(cfg).eval()
    return _lora(m, ("multi_modal_projector", "language_model.norm", "embed_tokens"))


def _rows(lens: list[int], n_img: int, img_id: int, prefix: list[int] | None = None):
    """Token rows: [prefix] + n_img image tokens + random text, lengths ``lens``."""
    rows = []
    for n in lens:
        head = (prefix or []) + [img_id] * n_img
        rows.append(torch.cat([torch.tensor(head), torch.randint(3, 56, (n - len(head),))]))
    return rows


def _row_ce(logits: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Sum of next-token CE over positions >= start of one row (``logits [T, V]``, ``ids [T]``)."""
    return F.cross_entropy(logits[start:-1].float(), ids[start + 1 :], reduction="sum")


def _padded_and_packed_losses(model, rows, start, extra_padded, extra_packed):
    B = len(rows)
    lens = [len(r) for r in rows]
    T = max(lens)
    ids = torch.zeros(B, T, dtype=torch.long)
    am = torch.zeros(B, T, dtype=torch.long)
    for r, x in enumerate(rows):
        ids[r, : lens[r]] = x
        am[r, : lens[r]] = 1

    extra = {k: v(ids) if callable(v) else v for k, v in extra_padded.items()}

    def padded() -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=am, use_cache=False, **extra).logits
        return torch.stack([_row_ce(logits[r, : lens[r]], rows[r], start) for r in range(B)])

    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    flat = torch.cat(rows)[None]
    seg = torch.repeat_interleave(torch.arange(B), torch.tensor(lens))
    total = int(cu[-1])
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    block = causal & (seg[:, None] == seg[None, :])
    pos = torch.cat([torch.arange(n) for n in lens])[None]

    kw_packed = {"position_ids": pos, **extra_packed}

    def packed() -> torch.Tensor:
        logits = model(
            input_ids=flat, attention_mask=block[None, None], use_cache=False, **kw_packed
        ).logits[0]
        return torch.stack([_row_ce(logits[cu[r] : cu[r + 1]], rows[r], start) for r in range(B)])

    return padded, packed, cu


PAIRS = torch.tensor([[0, 1], [0, 2], [1, 2], [2, 0]])


def test_tiny_llava_lora_padded_and_packed() -> None:
    model = tiny_llava()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n for n in names) and any("lora_A" in n for n in names)
    rows = _rows([9, 12, 7], n_img=4, img_id=V - 1, prefix=[1])
    px = torch.randn(3, 3, 28, 28)
    padded, packed, cu = _padded_and_packed_losses(
        model, rows, start=5, extra_padded={"pixel_values": px}, extra_packed={"pixel_values": px}
    )
    g_pad, _ = check_against_loop(model, padded, PAIRS)
    g_pack, _ = check_against_loop(model, packed, PAIRS, cu_seqlens=cu)
    # the same rows, padded or packed: segments are not mixed
    assert_close_rel(g_pack.norms, g_pad.norms)
    assert_close_rel(g_pack.cosines, g_pad.cosines)


def tiny_qwen2vl() -> torch.nn.Module:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        vision_config=dict(
            depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2,
            temporal_patch_size=2, spatial_merge_size=2, in_channels=3, mlp_ratio=2,
        ),
        image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 3,
        vision_end_token_id=V - 4,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    m = Qwen2VLForConditionalGeneration(cfg).eval()
    return _lora(m, ("visual.merger",))


def test_tiny_qwen2vl_lora_merger_padded_and_packed() -> None:
    model = tiny_qwen2vl()
    B = 3
    rows = _rows([10, 13, 9], n_img=4, img_id=V - 1, prefix=[V - 3])
    for r in rows:
        r[5] = V - 4  # vision_end after the 4 image tokens
    px = torch.randn(B * 16, 3 * 2 * 2 * 2)  # 16 patches of a 4 x 4 grid per image
    thw = torch.tensor([[1, 4, 4]] * B)
    # packed: each row's multimodal RoPE positions from get_rope_index on the row alone
    inner = model.get_base_model().model
    pos = torch.cat(
        [
            inner.get_rope_index(
                r[None], mm_token_type_ids=(r[None] == V - 1).int(), image_grid_thw=thw[:1]
            )[0]
            for r in rows
        ],
        dim=2,
    )  # [3, 1, total_T]
    padded, packed, cu = _padded_and_packed_losses(
        model, rows, start=6, extra_padded={
            "pixel_values": px,
            "image_grid_thw": thw,
            "mm_token_type_ids": lambda ids: (ids == V - 1).int(),
        },
        extra_packed={"pixel_values": px, "image_grid_thw": thw, "position_ids": pos},
    )  # fmt: skip
    merger = next(n for n, _ in model.named_modules() if n.endswith("visual.merger"))
    module_rows = {
        f"{merger}.ln_q": torch.arange(B + 1) * 16,  # patches of image r belong to row r
        f"{merger}.mlp": torch.arange(B + 1) * 4,  # merged tokens (2 x 2 patches each)
    }
    g_pad, _ = check_against_loop(model, padded, PAIRS, module_rows=module_rows)
    g_pack, _ = check_against_loop(model, packed, PAIRS, cu_seqlens=cu, module_rows=module_rows)
    assert_close_rel(g_pack.norms, g_pad.norms)
    assert_close_rel(g_pack.cosines, g_pad.cosines)
    with pytest.raises(ValueError, match="map to no rows"):
        with aimkp.per_sample_grad_gram(model, pairs=PAIRS):
            padded().sum().backward()


def test_tiny_llava_masked_copy_pairs() -> None:
    """Rows = one sample and its two masked copies (text tokens / image tokens hidden from
    attention by a per-row 4-D mask, kept tokens keep their positions); the GF cosines
    cos(original, copy) match the per-row loop."""
    model = tiny_llava()
    T = 14
    row = torch.cat([torch.tensor([1] + [V - 1] * 4), torch.randint(3, 56, (T - 5,))])
    ids = row.repeat(3, 1)
    keep = torch.ones(3, T, dtype=torch.bool)
    keep[1, 5:10:2] = False  # text copy: every other text token hidden
    keep[2, 1:4] = False  # image copy: 3 of the 4 image tokens hidden
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (causal[None] & keep[:, None, :]) | torch.eye(T, dtype=torch.bool)[None]
    px = torch.randn(1, 3, 28, 28).repeat(3, 1, 1, 1)  # one image, one projector call per row

    def fwd() -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=mask[:, None], pixel_values=px).logits
        return torch.stack([_row_ce(logits[r], ids[r], start=10) for r in range(3)])

    gram, G = check_against_loop(model, fwd, torch.tensor([[0, 1], [0, 2]]))
    assert (gram.cosines > -1).all() and (gram.cosines < 1).all()
    # Gradient-based Filtering: drop the text copy, double the image copy, after the backward
    scale = torch.tensor([1.0, 0.0, 2.0])
    model.zero_grad(set_to_none=True)
    with aimkp.per_sample_grad_gram(model, keep_for_reweight=True) as gram:
        fwd().sum().backward()
    gram.reweight(scale)
    assert_close_rel(flat_grads(model), (scale[:, None] * G).sum(0), rtol=1e-5)
