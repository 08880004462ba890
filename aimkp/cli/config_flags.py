"""``aimkp train``'s flags and ``--config`` YAML keys, generated from :class:`TrainConfig`.

One source of truth: a field's name gives its flag (``grad_accum`` -> ``--grad-accum``) and YAML
key, its type the parser (``int | None`` and ``float | None`` also take ``none``), its default the
help's default, its ``metadata`` the help text and optionally ``choices``, ``aliases``
(``--preset`` for ``--model``), ``metavar`` and ``flag`` (another flag name: ``--threads``,
``--no-eval`` for a field that defaults to True). A bool field defaulting to False is a
``store_true`` flag, one defaulting to True a ``--no-NAME`` flag. A new field gets its flag and
its YAML key without any change here.

Every generated flag defaults to ``argparse.SUPPRESS``, so the parsed namespace holds only the
flags that were given: :func:`given_fields` reads them back as field values, and they win over a
``--config`` file and ``--quick`` (see :func:`aimkp.cli.train.config_from_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import typing
from typing import Any

from aimkp.errors import UsageError

# fields whose flags the shared reading flags add (aimkp.cli._common.add_read_arguments)
SHARED_READ_FIELDS = ("image_dir", "on_missing_image", "on_bad_record")


def _opt(parse: type) -> Any:
    def f(s: str) -> Any:
        """``none`` / ``off`` -> None (0 stays a number, so a typo cannot turn clipping off)."""
        return None if s.lower() in ("none", "off") else parse(s)

    f.__name__ = parse.__name__  # argparse names the type in its error message
    return f


def _comma_list(s: str) -> list[str]:
    """``lr,projector-lr`` -> ``["lr", "projector_lr"]`` (field names, as flags or keys)."""
    return [n.strip().replace("-", "_") for n in s.split(",") if n.strip()]


def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """``{name: (base type, None allowed)}`` of a dataclass's fields (``int | None`` ->
    ``(int, True)``)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[type, bool]] = {}
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is list:  # list[str]: a comma-separated flag
            out[f.name] = (list, False)
            continue
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        base = [a for a in args if a is not type(None)]
        out[f.name] = (base[0], len(base) < len(args))
    return out


def flag_name(f: dataclasses.Field) -> str:
    if "flag" in f.metadata:
        return f.metadata["flag"]
    if f.type in ("bool", bool) and f.default is True:
        return "--no-" + f.name.replace("_", "-")
    return "--" + f.name.replace("_", "-")


def add_field_flags(group: Any, f: dataclasses.Field, base: type, optional: bool) -> None:
    """The flag of one field (default SUPPRESS: absent from the namespace unless given)."""
    meta = f.metadata
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    help_ = meta.get("help", "")
    if base is bool:
        kw["action"] = "store_false" if f.default is True else "store_true"
    elif base is list:
        kw["type"] = _comma_list
        kw["metavar"] = meta.get("metavar", "A,B")
    else:
        kw["type"] = _opt(base) if optional and base in (int, float) else base
        for k in ("choices", "metavar"):
            if k in meta:
                kw[k] = meta[k]
        help_ += f" (default: {f.default})"
    group.add_argument(flag_name(f), *meta.get("aliases", ()), help=help_, **kw)


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, groups: dict[str, tuple[str, ...]]
) -> None:
    """Every field's flag, in ``groups`` (title -> field names; the rest under "other")."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = field_types(cls)
    placed = {n for names in groups.values() for n in names} | set(SHARED_READ_FIELDS)
    rest = tuple(n for n in fields if n not in placed)
    for title, names in {**groups, "other": rest}.items():
        if not names:
            continue
        g = parser.add_argument_group(title)
        for n in names:
            add_field_flags(g, fields[n], *types[n])


def given_fields(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The field values of the flags that were given (every field's flag defaults to
    ``argparse.SUPPRESS``, so only given flags are in ``args``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _check_value(where: str, key: str, value: Any, base: type, optional: bool) -> Any:
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "off", "null"):
        value = None  # what the flag takes ('--max-grad-norm none')
    if optional and value is False and base in (int, float):
        value = None  # YAML 1.1 reads a bare ``off`` / ``no`` as false
    if value is None and optional:
        return None
    if base is float and isinstance(value, str):
        # YAML 1.1 reads ``1e-3`` (no dot in the mantissa) as a string; the user meant 0.001
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if base is list:  # a YAML list of names, or one comma-separated string
        if isinstance(value, str):
            return _comma_list(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [v.replace("-", "_") for v in value]
        raise UsageError(f"{where}: key {key!r} must be a list of names, got {value!r}")
    ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        want = base.__name__ + (" or null" if optional else "")
        raise UsageError(f"{where}: key {key!r} must be {want}, got {value!r}")
    return value


def _unique_keys_loader(yaml: Any, path: pathlib.Path) -> type:
    """yaml's SafeLoader refusing a key given twice (it keeps the last one silently)."""

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise UsageError(
                        f"--config {path}: line {line}: key {key!r} given twice (first at line "
                        f"{seen[key]}); the second would silently win"
                    )
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_yaml_config(path: str | pathlib.Path, cls: type) -> dict[str, Any]:
    """The fields a YAML file sets (keys: field names); UsageError (one line) for a missing or
    malformed file, an unknown key or a value of the wrong type."""
    import yaml

    p = pathlib.Path(path).expanduser()
    try:  # utf-8-sig: a byte-order mark (Windows editors) is not part of the first key
        data = yaml.load(p.read_text(encoding="utf-8-sig"), Loader=_unique_keys_loader(yaml, p))
    except UnicodeDecodeError as exc:
        raise UsageError(f"--config {p}: not UTF-8 text (byte {exc.start})") from None
    except UsageError:
        raise
    except OSError as exc:
        raise UsageError(f"--config {p}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"--config {p}: not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {p}: expected a mapping of option names to values")
    types = field_types(cls)
    data = {str(k).replace("-", "_"): v for k, v in data.items()}  # grad-accum as grad_accum
    unknown = sorted(str(k) for k in data if k not in types)
    if unknown:
        raise UsageError(
            f"--config {p}: unknown key(s) {', '.join(unknown)} (keys are the long flags with "
            "'_', e.g. grad_accum)"
        )
    return {k: _check_value(f"--config {p}", k, v, *types[k]) for k, v in data.items()}
