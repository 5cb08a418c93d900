"""One-way layers inside pcc_dist, read from the source (AST only: no module is imported).

A *node* is a package-level unit: ``pcc_dist.<first component>``, i.e. a top-level module
(``pcc_dist/config.py``) or a subpackage (``pcc_dist/modeling/``; ``kernels/``, installed as
``pcc_dist.kernels``, is one node). ``pcc_dist/__init__.py`` itself is the node ``pcc_dist``.
Every ``import`` and ``from ... import`` counts, wherever it stands (inside functions, under
``TYPE_CHECKING``), with relative imports resolved. Imports inside one node are free.

Two rules:
    (a) no import cycle between nodes;
    (b) every node sits in exactly one layer of :data:`LAYERS`, and no node imports a node of a
        higher layer (imports within a layer are allowed; rule (a) keeps them acyclic).
A new module fails (b) until it is placed in the table.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The layers in dependency order, lowest first: a node may import its own layer and those above
# it in this dict, never one below. Where a change goes: README "Code map".
LAYERS: dict[str, tuple[str, ...]] = {
    # Process group, devices, files, names: import nothing of pcc_dist.
    "foundation": ("errors", "distributed", "devices", "hf_names", "output_paths", "progress",
                   "safe_loading", "offload", "single_rank"),
    # The cross-rank contract both loss implementations share (collectives, checks, records).
    "cross_rank": ("cross_rank",),
    # Triton kernels (kernels/ = pcc_dist.kernels).
    "kernels": ("kernels",),
    # Loss modules, the pure-torch oracles, the kernel choice.
    "losses": ("losses",),
    # The PccConfig tree and its loader (validates loss.kernel against the losses).
    "config": ("config_yaml", "config_build", "config_checks", "config_docs", "config"),
    # Run folders and checkpoints on disk.
    "checkpoint": ("checkpoint", "checkpoint_manager", "universal_checkpoint", "stage_memory",
                   "resume_from", "stage_checkpoints"),
    # What a step is made of: data, models, batches, STS scoring, tracking.
    "components": ("data", "modeling", "sampling", "step_inputs", "length_chunks", "gradcache",
                   "sharded_encode", "sts_protocol", "evaluation", "tracking", "model_card",
                   "stage_data", "step_log", "dev_eval"),
    # DeepSpeed: the JSON resolver, optimizer and schedule, the world-size-portable checkpoint
    # state, the engine, the memory plan.
    "engine": ("ds_checks", "ds_hf_auto", "ds_config", "optim", "portable_state", "engine",
               "memory_plan"),
    # What a command runs: training, preflight, export.
    "run": ("trainer", "preflight", "export_target", "st_modules", "export"),
    # Command lines.
    "cli": ("cli", "data_cli", "eval_cli"),
    # The lazy public API (``from pcc_dist import ...``).
    "api": ("pcc_dist",),
}



@dataclass(frozen=True)
class Edge:
    """``source`` (a node) imports ``target`` (a node) at ``file:line``."""

    source: str
    target: str
    file: str
    line: int


def package_files(root: Path, package: str, extra: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file for every ``.py`` under ``root/package``, plus ``extra``
    subpackages (dotted name -> folder) whose files live elsewhere (kernels/)."""
    folders = {package: root / package, **extra}
    files: dict[str, Path] = {}
    for dotted, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if dotted == package and rel[0] in {k.split(".")[1] for k in extra}:
                continue  # reached through a link: counted under its own entry
            parts = [*dotted.split("."), *rel]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def node_of(module: str) -> str:
    """``pkg.x.y`` -> ``x``; the package itself -> its own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _targets(tree: ast.AST, module: str, is_package: bool, modules: set[str]):
    """Yield ``(line, imported module)`` for every import statement in ``tree``."""
    home = module if is_package else module.rsplit(".", 1)[0]
    for stmt in ast.walk(tree):
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                yield stmt.lineno, alias.name
        elif isinstance(stmt, ast.ImportFrom):
            base = stmt.module or ""
            if stmt.level:
                anchor = home.split(".")[: len(home.split(".")) - (stmt.level - 1)]
                base = ".".join([*anchor, *([stmt.module] if stmt.module else [])])
            for alias in stmt.names:
                sub = f"{base}.{alias.name}"
                # ``from pkg import submodule`` imports the submodule, not the package.
                yield stmt.lineno, sub if sub in modules else base


def import_edges(files: dict[str, Path], package: str) -> list[Edge]:
    """Every import between two different nodes of ``package``, once per (file, line, target)."""
    modules = set(files)
    edges: dict[Edge, None] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        source = node_of(module)
        for line, target in _targets(tree, module, path.name == "__init__.py", modules):
            if target != package and not target.startswith(package + "."):
                continue
            if node_of(target) != source:
                shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                edges[Edge(source, node_of(target), str(shown), line)] = None
    return list(edges)


def find_cycles(edges: list[Edge]) -> list[list[str]]:
    """The node cycles (strongly connected components with more than one node), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan; the graph has ~50 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def cycle_report(cycle: list[str], edges: list[Edge]) -> str:
    """The imports that close one cycle, as ``file:line imports node``."""
    inside = [e for e in edges if e.source in cycle and e.target in cycle]
    return "cycle " + " <-> ".join(cycle) + ": " + "; ".join(
        f"{e.file}:{e.line} imports {e.target}" for e in inside)


def upward_imports(edges: list[Edge], layers: dict[str, tuple[str, ...]]) -> list[str]:
    """One message per import of a higher layer's node."""
    rank = {node: i for i, members in enumerate(layers.values()) for node in members}
    name = {node: layer for layer, members in layers.items() for node in members}
    return [f"{e.file}:{e.line} imports {e.target} (layer {name[e.target]}) from layer "
            f"{name[e.source]}" for e in edges
            if e.source in rank and e.target in rank and rank[e.target] > rank[e.source]]


@functools.cache
def _pcc_dist_edges() -> tuple[set[str], list[Edge]]:
    files = package_files(REPO, "pcc_dist", {"pcc_dist.kernels": REPO / "kernels"})
    return {node_of(m) for m in files}, import_edges(files, "pcc_dist")


def test_no_import_cycle_between_pcc_dist_nodes():
    _, edges = _pcc_dist_edges()
    cycles = find_cycles(edges)
    assert not cycles, "\n".join(cycle_report(c, edges) for c in cycles)


def test_every_node_has_one_layer_and_no_import_goes_up():
    nodes, edges = _pcc_dist_edges()
    placed = [n for members in LAYERS.values() for n in members]
    assert len(placed) == len(set(placed)), "a node is listed in two layers"
    assert not nodes - set(placed), (f"place {sorted(nodes - set(placed))} in LAYERS "
                                     "(tests/unit/test_layers.py) and the README code map")
    assert not set(placed) - nodes, f"LAYERS names nodes that no longer exist: " \
                                    f"{sorted(set(placed) - nodes)}"
    problems = upward_imports(edges, LAYERS)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# Negative controls: a fake package written to tmp_path
# ------------------------------------------------------------------------------------------------


def _fake_package(tmp_path: Path, sources: dict[str, str]) -> list[Edge]:
    for rel, text in {"fake/__init__.py": "", **sources}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_edges(package_files(tmp_path, "fake", {}), "fake")


def test_negative_control_a_cycle_through_a_function_level_relative_import_is_found(tmp_path):
    edges = _fake_package(tmp_path, {
        "fake/low.py": "import os\n",
        "fake/a.py": "from fake import b\n",
        # Relative, inside a function, from a subpackage module: still an edge b -> a.
        "fake/b/__init__.py": "",
        "fake/b/inner.py": "def f():\n    from .. import a\n    return a\n",
    })
    assert find_cycles(edges) == [["a", "b"]]
    assert "fake/b/inner.py:2 imports a" in cycle_report(["a", "b"], edges)
    # The same package without the function-level import has no cycle.
    (tmp_path / "fake/b/inner.py").write_text("import os\n")
    assert find_cycles(import_edges(package_files(tmp_path, "fake", {}), "fake")) == []


def test_negative_control_an_upward_import_is_reported_with_file_and_line(tmp_path):
    edges = _fake_package(tmp_path, {
        "fake/base.py": "X = 1\n",
        "fake/top.py": "from .base import X\n",
        "fake/mid.py": "from fake.base import X\n\n\ndef g():\n    from fake import top\n",
    })
    layers = {"bottom": ("base",), "middle": ("mid",), "high": ("top",)}
    assert upward_imports(edges, layers) == [
        f"{tmp_path / 'fake/mid.py'}:5 imports top (layer high) from layer middle"]
    # Downward and same-layer imports pass.
    assert upward_imports(edges, {"bottom": ("base",), "rest": ("mid", "top")}) == []


@pytest.mark.parametrize(("module", "node"), [("pcc_dist", "pcc_dist"),
                                              ("pcc_dist.config", "config"),
                                              ("pcc_dist.kernels.infonce", "kernels")])
def test_node_of(module, node):
    assert node_of(module) == node
