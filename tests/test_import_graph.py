"""The import graphs of the ``mace_sparse`` runtime and of the repository's ``harness`` have no cycle, and the
runtime never imports the harness (which is not shipped).

Every module of the package is parsed (not imported), and every ``import`` / ``from ... import`` statement that
resolves to a ``mace_sparse`` module becomes an edge, at module level or inside a function alike: a cycle hidden
in a function-level import is still a cycle (it only moves the failure from import time to call time).
``from pkg import name`` counts as an edge to ``pkg.name`` where that is a module, else to ``pkg``.

A package's ``__init__`` is not made an edge of its submodules (Python runs it first, but it is the parent that
names the child, not the other way round); an explicit ``from . import x`` in the package is an edge as usual.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import harness
import mace_sparse

PACKAGE = "mace_sparse"
ROOTS = {name: Path(pkg.__file__).resolve().parent for name, pkg in (("mace_sparse", mace_sparse),
                                                                    ("harness", harness))}


def _module_names() -> Dict[str, Path]:
    names = {}
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join([package, *parts])] = path
    return names


MODULES = _module_names()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> Optional[str]:
    """The absolute module a ``from`` statement names (``None`` if outside the package)."""
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, path: Path) -> Iterator[str]:
    """Every package module that ``module`` imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            if base is None:
                continue
            for alias in node.names:
                child = f"{base}.{alias.name}"
                yield child if child in MODULES else base


def _graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for module, path in MODULES.items():
        edges = set()
        for target in _targets(module, path):
            # ``import a.b.c`` runs a.b.c: keep the deepest name that is a module of the package
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a readable path."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[Set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_cycle(graph, component) for component in components]


def _one_cycle(graph: Dict[str, Set[str]], component: Set[str]) -> List[str]:
    """A shortest cycle through the component's first module (breadth-first), e.g. ``[a, b, a]``."""
    start = min(component)
    parents: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle found in strongly connected component {sorted(component)}")


def _report(cycles: List[List[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_graph_sees_the_package():
    graph = _graph()
    assert "mace_sparse.integration.mace_plugin" in graph and "mace_sparse._bootstrap" in graph
    assert "mace_sparse.config" in graph["mace_sparse.integration.arguments"]


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycle_in_the_package():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (one per strongly connected set of modules):\n" + _report(cycles)


def test_the_runtime_never_imports_the_harness():
    """The wheel ships ``mace_sparse`` only; its commands reach the harness through ``cli.harness_shim``."""
    graph = _graph()
    assert any(target.startswith("harness") for target in graph["harness.pipeline.runner"])  # the graph sees it
    offenders = {module: sorted(t for t in targets if t == "harness" or t.startswith("harness."))
                 for module, targets in graph.items() if module.startswith(PACKAGE)}
    assert not {m: t for m, t in offenders.items() if t}


def test_wiring_state_is_a_leaf():
    """The start-up hook imports :mod:`mace_sparse.integration.state` in every interpreter: nothing but ``os``."""
    module = "mace_sparse.integration.state"
    assert _graph()[module] == set()
    tree = ast.parse(MODULES[module].read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "os"}, imported
