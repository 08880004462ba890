"""Built-in rules, one file per layer type; importing this package registers them."""

from aimkp.engine.rules import embedding, linear, masked_embedding, norm  # noqa: F401
