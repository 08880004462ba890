"""Method specs of ``aimkp compare``: ``sft``, ``aimkp``, or a variant ``METHOD:FIELD=VALUE,...``.

A variant is a method with :class:`aimkp.train.TrainConfig` fields changed, e.g.
``aimkp:gf_reduce=sum`` or ``aimkp:lr=1e-3,tau_text=0.3``; values are parsed by the field's type
(``none`` for an optional field's None, ``true`` / ``false`` for flags).

>>> parse_method("aimkp:gf_reduce=sum,lr=1e-3").options
{'gf_reduce': 'sum', 'lr': 0.001}
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from aimkp.errors import UsageError
from aimkp.train.config import METHODS, TrainConfig

# fields the comparison itself sets: the same for every method, or one per run
CONTROLLED = frozenset(
    {
        "method",
        "seed",
        "output",
        "resume",
        "data",
        "epochs",
        "max_train_samples",
        "eval_max_samples",
        "eval_every_epoch",
        "stop_after_epochs",
        "baselines",
        "extra",
    }
)
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class Method:
    """One compared method: its label as given, the training method and its config changes."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """The label as a directory name (``aimkp:gf_reduce=sum`` -> ``aimkp_gf_reduce=sum``)."""
        return re.sub(r"[^A-Za-z0-9._=+-]", "_", self.label.replace(",", "+"))


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def parse_value(name: str, type_name: str, text: str) -> Any:
    """``text`` as TrainConfig field ``name`` of type ``type_name`` (e.g. ``"float | None"``)."""
    t = text.strip()
    optional = "None" in type_name
    if optional and t.lower() == "none":
        return None
    base = type_name.replace("| None", "").strip()
    try:
        if base == "bool":
            if t.lower() not in _TRUE + _FALSE:
                raise ValueError
            return t.lower() in _TRUE
        if base == "int":
            return int(t)
        if base == "float":
            return float(t)
    except ValueError:
        raise UsageError(f"option {name}={text!r}: expected {type_name}") from None
    if base == "str":
        return t
    raise UsageError(f"option {name!r} cannot be set from the command line (type {type_name})")


def parse_method(spec: str) -> Method:
    """``"aimkp:gf_reduce=sum"`` -> :class:`Method`; ValueError naming what is wrong."""
    spec = spec.strip()
    name, sep, opts = spec.partition(":")
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r} in {spec!r}; known: {', '.join(METHODS)}")
    if sep and not opts:
        raise UsageError(f"method {spec!r}: no options after ':'")
    types = _field_types()
    options: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in opts.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise UsageError(f"method {spec!r}: option {item!r} is not FIELD=VALUE")
        if key not in types:
            raise UsageError(f"method {spec!r}: unknown TrainConfig field {key!r}")
        if key in CONTROLLED:
            raise UsageError(
                f"method {spec!r}: {key!r} is set by the comparison for every method "
                "(use the compare option instead)"
            )
        if key in options:
            raise UsageError(f"method {spec!r}: option {key!r} given twice")
        try:
            options[key] = parse_value(key, types[key], value)
        except ValueError as exc:
            raise UsageError(f"method {spec!r}: {exc}") from None
    return Method(label=spec, method=name, options=options)


def parse_methods(text: str) -> list[Method]:
    """A comma-separated list where a variant's options follow ``:`` and also use commas:
    ``"sft,aimkp:lr=1e-3,tau_text=0.3,aimkp"`` -> sft, ``aimkp:lr=1e-3,tau_text=0.3``, aimkp
    (a piece without ``=`` starts the next method)."""
    pieces = [p.strip() for p in text.split(",") if p.strip()]
    specs: list[str] = []
    for p in pieces:
        if "=" in p and ":" not in p and specs and ":" in specs[-1]:
            specs[-1] += "," + p
        else:
            specs.append(p)
    if not specs:
        raise UsageError("no methods given")
    methods = [parse_method(s) for s in specs]
    labels = [m.label for m in methods]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise UsageError(f"method given twice: {', '.join(dup)}")
    slugs = [m.slug for m in methods]
    if len(set(slugs)) != len(slugs):
        raise UsageError(f"methods {labels} map to the same run directory names")
    return methods
