"""Per-sample gradient engine: per-row gradient norms and pair inner products from one backward.

- :func:`per_sample_grad_gram` / :class:`GradGram`: the context manager (``gram.py``).
- :func:`register_rule`, :class:`Rule`, :class:`Tokens`: add a layer type (``registry.py``).
- ``aimkp.engine.reference``: the two references (torch.func vmap over grad; a loop of one
  backward per row with cloned gradients).
"""

from aimkp.engine.gram import GradGram, per_sample_grad_gram
from aimkp.engine.registry import Rule, Tokens, get_rule, register_rule, registered_rules

__all__ = [
    "GradGram",
    "Rule",
    "Tokens",
    "get_rule",
    "per_sample_grad_gram",
    "register_rule",
    "registered_rules",
]
