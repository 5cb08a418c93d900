"""The config's documentation, read from the dataclasses themselves and rendered for ``--help``.

A field's documentation is the string literal right under it in :mod:`pcc_dist.config` (an
attribute docstring, as Sphinx reads them); :func:`field_docs` parses them from the class
source, so the code and the help text cannot drift apart. :func:`config_leaves` walks the tree
to its leaves (``model.lora.r``), each with its type, default and doc, and :func:`render_help`
prints them grouped by section, as ``pcc-train --help`` shows them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

from pcc_dist.config_build import type_name


@dataclass(frozen=True)
class Leaf:
    """One settable value of the config tree.

    Attributes:
        key: Dotted key, as in overrides (``model.lora.r``).
        type: The type as messages write it (``int``, ``'auto' | 'never'``, ``str or null``).
        default: The default value.
        doc: The field's docstring ("" when it has none).
    """

    key: str
    type: str
    default: Any
    doc: str


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` of dataclass ``cls``, from the string under each field.

    Returns an empty dict when the source is not available (a build without ``.py`` files).
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def config_leaves(root: Any) -> list[Leaf]:
    """Every leaf of dataclass instance ``root`` (for the defaults pass ``PccConfig()``), in
    field order."""
    leaves: list[Leaf] = []

    def walk(obj: Any, prefix: str) -> None:
        cls = type(obj)
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                leaves.append(Leaf(key, type_name(hints[f.name]), value, docs.get(f.name, "")))

    walk(root, "")
    return leaves


def show_value(value: Any) -> str:
    """A default as it is written in an override (``null``, ``true``, ``[STS12, STS13]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return str(value)


def render_help(root: Any, width: int = 96) -> str:
    """Every leaf of ``root`` with key, type, default and doc, grouped by top-level section.

    Each section starts with the doc of its field in ``type(root)`` (``model: Backbone, ...``).
    """
    section_docs = field_docs(type(root))
    lines = ["config keys (set them in the YAML file or as key=value overrides):"]
    section = None
    for leaf in config_leaves(root):
        head = leaf.key.split(".")[0]
        if head != section:
            section = head
            lines += ["", f"{head}: {section_docs.get(head, '')}".rstrip()]
        lines.append(f"  {leaf.key} ({leaf.type}; default {show_value(leaf.default)})")
        lines += textwrap.wrap(" ".join(leaf.doc.split()), width,
                               initial_indent="      ", subsequent_indent="      ",
                               break_on_hyphens=False)
    return "\n".join(lines) + "\n"
