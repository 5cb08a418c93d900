"""Reading a YAML config file safely: repeated keys refused, alias bombs refused, every failure
a problem line naming the file.

PyYAML's ``SafeLoader`` builds no arbitrary objects, but it silently keeps the last of two equal
keys and expands anchors without limit; :class:`_UniqueKeyLoader` refuses both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pcc_dist.errors import PccError


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated within one mapping.

    PyYAML keeps the last value silently; for a repeated section (two ``model:`` blocks, as when
    two recipes are pasted together) that drops every key of the first block without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: merged defaults, which the explicit keys may override
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found key {key!r} again (first at line {first.line + 1}, column "
                    f"{first.column + 1}); each key may appear once per section, merge the two "
                    "blocks", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expanded_size(node)
        return super().construct_document(node)


# A whole config has about 100 values (about 70 fields, eval.tasks 7 entries); 10,000 leaves
# 100x room for anchors and merge keys. A "billion laughs" file of a few hundred bytes (9 levels
# of 9 aliases each) expands to 9^9 values, which every later step (type checks, error messages)
# would walk.
MAX_EXPANDED_VALUES = 10_000


class AliasBombError(PccError, yaml.YAMLError):
    """YAML whose aliases expand past :data:`MAX_EXPANDED_VALUES` values, or refer to themselves."""


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values of ``root`` with every alias expanded, stopping at the limit.

    Aliases are the same node object in PyYAML's graph, so sizes are memoised per node: the
    count costs one visit per distinct node however large the expansion.

    Raises:
        AliasBombError: More than :data:`MAX_EXPANDED_VALUES` values, or a recursive alias.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise AliasBombError("an alias refers to the node that contains it (a recursive "
                                 "structure); write the values out")
        open_nodes.add(id(node))
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        total = 1 + sum(size(child) for child in children)
        if total > MAX_EXPANDED_VALUES:
            raise AliasBombError(f"its anchors and aliases expand to more than "
                                 f"{MAX_EXPANDED_VALUES:,} values (an alias bomb, \"billion "
                                 "laughs\"); a config needs about 100, write the values out")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def load_yaml(text: str) -> Any:
    """Parse ``text`` with :class:`_UniqueKeyLoader`."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds no arbitrary objects


def read_yaml(path: str | Path, problems: list[str]) -> dict[str, Any]:
    """Read a YAML config file; a missing or malformed file becomes a problem line."""
    path = Path(path)
    if not path.is_file():
        problems.append(f"--config {path}: file not found; pass the path of a YAML file "
                        "(recipes live in launchers/configs/).")
        return {}
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except AliasBombError as exc:
        problems.append(f"--config {path}: refused: {exc}.")
        return {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problems.append(f"--config {path}: not valid YAML ({exc}).")
        return {}
    except (ValueError, RecursionError) as exc:
        # Valid YAML PyYAML cannot build: an integer of more than 4,300 digits (ValueError) or
        # nesting deeper than the recursion limit. Not a crash, a problem line like the others.
        reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)
        problems.append(f"--config {path}: cannot be loaded ({reason}).")
        return {}
    except OSError as exc:
        problems.append(f"--config {path}: cannot be read ({exc.strerror or exc}).")
        return {}
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"--config {path}: the top level must be a mapping of sections "
                        f"(run, model, stage1, ...), got {type(raw).__name__}.")
        return {}
    return raw
