"""Built-in rules, one file per layer type; importing this package registers them."""

from aimkp.engine.rules import embedding, linear, norm  # noqa: F401
