"""The 7B shapes (aimkp.models.shapes) at CPU size: config overrides cutting the widths and
keeping the real models' head / KV-head ratios, so tests build the same code path in seconds."""

from __future__ import annotations

from typing import Any

SMALL: dict[str, dict[str, dict[str, Any]]] = {
    "llava7b": {
        "text": {"hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "vocab_size": 1},
        "vision": {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 2},
    },
    "qwen2vl7b": {
        "text": {"hidden_size": 56, "intermediate_size": 296, "num_attention_heads": 7,
                 "num_key_value_heads": 1, "vocab_size": 1,
                 "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2],
                                     "rope_theta": 1e6}},
        "vision": {"embed_dim": 32, "hidden_size": 56, "num_heads": 2},
    },
}  # fmt: skip
