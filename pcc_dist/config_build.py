"""Building the config tree from raw mappings: type checks, dotted overrides, blame.

:func:`build` applies a nested mapping (from YAML and overrides) onto a config dataclass,
converting only what converts losslessly and collecting one problem line per bad key or value
instead of raising at the first. :func:`parse_overrides` turns ``section.key=value`` strings into
such a mapping; :func:`blame` finds the override behind a problem line, so the message can name
it. The dataclasses themselves live in :mod:`pcc_dist.config`; this module takes them as
arguments and imports nothing from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import yaml

from pcc_dist.config_yaml import load_yaml
from pcc_dist.hf_names import canonical_key, hf_hint


def type_name(tp: Any) -> str:
    """How a field type reads in messages and ``--help``: ``'full' | 'lora'``, ``int or null``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, value converted to ``tp``). Only lossless conversions are accepted."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return (value in typing.get_args(tp), value)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        items = [_coerce(v, inner) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        # YAML reads "5e-4" as a string (YAML 1.1 needs a dot), so accept numeric strings too.
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            return False, value
        try:
            return True, float(value)
        except OverflowError:  # an integer beyond float range (10**400) is no float
            return False, value
    if tp is str:
        return isinstance(value, str), value
    return False, value


def _did_you_mean(value: Any, tp: Any) -> str:
    """A suggestion for a mistyped choice (``"qlra"`` -> ``"qlora"``), else ``""``."""
    choices = [a for a in _literal_choices(tp) if isinstance(a, str)]
    if not isinstance(value, str) or not choices:
        return ""
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _literal_choices(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return tuple(c for arg in typing.get_args(tp) for c in _literal_choices(arg))
    return ()


def build(cls: type, raw: Any, path: str, problems: list[str], base: Any) -> Any:
    """Apply mapping ``raw`` onto dataclass instance ``base`` of type ``cls``; a key or value
    that does not fit becomes a line in ``problems`` and keeps ``base``'s value."""
    if not isinstance(raw, dict):
        problems.append(f"{path or '<top level>'}: expected a mapping of settings, got "
                        f"{raw!r}; write it as `key: value` lines.")
        return base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    updates: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = hf_hint(path, str(key)) or (
                f"did you mean `{(path + '.') if path else ''}{close[0]}`?" if close else
                f"valid keys here: {', '.join(names)}.")
            problems.append(f"{dotted}: unknown key; {hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            updates[key] = build(tp, value, dotted, problems, getattr(base, key))
            continue
        ok, converted = _coerce(value, tp)
        if not ok:
            problems.append(f"{dotted}: got {value!r}, expected {type_name(tp)}."
                            + _did_you_mean(value, tp))
            continue
        updates[key] = converted
    return dataclasses.replace(base, **updates)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def parse_overrides(root: type, overrides: list[str], problems: list[str],
                    origins: dict[str, str] | None = None,
                    labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested mapping; values are parsed as YAML scalars.

    A field that takes text gets the override's raw text when YAML reads it as something the
    field cannot take: ``model.template=Query: {s}`` is a YAML mapping and ``run.name=007`` the
    integer 7, but both fields want the string as typed. Quotes still work as in YAML
    (``run.name="a: b"`` is ``a: b``), and ``null`` still means None.

    Args:
        root: The config dataclass the keys are relative to (:class:`~pcc_dist.config.PccConfig`).
        overrides: ``section.key=value`` strings.
        problems: Malformed overrides are appended here.
        origins: When given, filled with dotted key -> how the user gave it, e.g. "the
            command-line override `stage2.lr=-1`" (used to blame problems on it).
        labels: Override string -> how to name it instead (``pcc-eval`` flags: "--template").
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            problems.append(f"override {item!r}: expected `section.key=value`, "
                            "e.g. `stage2.lr=1e-4`.")
            continue
        key = canonical_key(key)  # an HF name (stage2.learning_rate) is our key (stage2.lr)
        _set_dotted(tree, key, _override_value(text, _field_type(root, key)))
        if origins is not None:
            origins[key] = (labels or {}).get(item, f"the command-line override `{item}`")
    return tree


def _override_value(text: str, tp: Any) -> Any:
    """The value of one override: YAML's reading of ``text``, or ``text`` itself when only the
    raw text fits the field's type ``tp`` (None: unknown field, YAML's reading)."""
    try:
        value = load_yaml(text) if text.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):
        # Not a YAML scalar (or one PyYAML cannot build: an integer of more than 4,300
        # digits raises ValueError, "[[[..." thousands deep RecursionError): keep the text,
        # and the field's type check reports it.
        return text
    if tp is not None and not _coerce(value, tp)[0] and _coerce(text, tp)[0]:
        return text
    return value


def _field_type(root: type, dotted: str) -> Any:
    """The annotated type of the field at ``dotted`` below dataclass ``root``, or None when there
    is no such field."""
    tp: Any = root
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return None
    return tp


# A field named in a problem line: the leading `key:` or any dotted name (`model.kind='x'`).
_MENTIONED_KEY = re.compile(r"^[A-Za-z_][\w.]*(?=:)|\b[A-Za-z_]\w*(?:\.\w+)+")


def blame(problem: str, origins: Mapping[str, str]) -> str | None:
    """The overrides behind ``problem`` ("the command-line override `k=v`"), or None.

    An override is behind a problem that names its key, a field inside it (``model.lora.r`` for
    ``model.lora={r: 0}``) or a section above it (``modle`` for the unknown ``modle.mode``).
    """
    mentioned = _MENTIONED_KEY.findall(problem)
    blamed = [origin for key, origin in origins.items()
              if any(m == key or m.startswith(key + ".") or key.startswith(m + ".")
                     for m in mentioned)]
    return " and ".join(dict.fromkeys(blamed)) or None


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, recursively for mappings on both sides (a new dict)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
