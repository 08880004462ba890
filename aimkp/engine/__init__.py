"""Per-sample gradient engine: per-row gradient norms and pair inner products from one backward.

- :func:`per_sample_grad_gram` / :class:`GradGram`: the context manager (``gram.py``).
- :func:`register_rule`, :class:`Rule`, :class:`Tokens`, :class:`GramRequest`: add a layer type
  (``registry.py``).
- Parts of the context: ``rows.py`` (row layout), ``hooks.py``, ``accumulate.py``,
  ``reweight.py`` (exact reweight, also with a non-finite row: see ``GradGram.finite_rows``).
- ``aimkp.engine.reference``: the two references (torch.func vmap over grad; a loop of one
  backward per row with cloned gradients).

Built-in rules: ``nn.Linear`` (so peft LoRA's ``lora_A`` / ``lora_B`` and projector layers),
``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm`` and RMSNorm-like classes (transformers'
``LlamaRMSNorm``, ``Qwen2RMSNorm``), ``aimkp.ops.MaskedEmbedding``; tied weights (one parameter
owned by several modules, e.g. ``tie_word_embeddings``) get the owners' cross terms
(``aimkp.engine.tied``). What is refused with a ValueError rather than computed wrong: a trainable
parameter of a module type without a rule, a tied parameter whose rules give no factors
(``Rule.factor_params``), parameters used outside their module's forward (or run without grad and
recomputed by reentrant checkpointing), tokens that map to no row. Assumed, not checkable:
activations are batch-first (``[B, T, ...]`` padded, ``[1, total_T, ...]`` packed) and each token of
a hooked call belongs to one row (a projector output reused by several rows must be computed per
row).
"""

from aimkp.engine.gram import GradGram, per_sample_grad_gram
from aimkp.engine.registry import (
    GramRequest,
    Rule,
    Tokens,
    get_rule,
    register_rule,
    registered_rules,
)

__all__ = [
    "GradGram",
    "GramRequest",
    "Rule",
    "Tokens",
    "get_rule",
    "per_sample_grad_gram",
    "register_rule",
    "registered_rules",
]
