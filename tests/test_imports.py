"""Every module of ``interlingua`` imports, and the import graph has no cycle.

The graph is read with ``ast`` from the package's source folders (the layout ``setup.py`` maps:
``proto/interlingua`` -> ``interlingua``, ``server`` -> ``interlingua.server``, ``client`` ->
``interlingua.client``). An edge is an import a module runs, at its top or inside a function;
imports under ``if TYPE_CHECKING:`` run only for the type checker and are left out. A cycle is
reported as the chain of modules that closes it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOTS = {
    "interlingua": ROOT / "proto" / "interlingua",
    "interlingua.server": ROOT / "server",
    "interlingua.client": ROOT / "client",
}


def modules() -> dict[str, Path]:
    """Module name -> source file, packages named by their ``__init__.py``."""
    out: dict[str, Path] = {}
    for name, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("").parts
            if "__pycache__" in rel or any(p.startswith(".") for p in rel):
                continue
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            out[".".join((name, *parts))] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names]
            graph[mod].update(t for t in targets if t in mods and t != mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it is acyclic (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_reader_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_covers_the_package() -> None:
    graph = import_graph()
    assert {"interlingua.server.engine", "interlingua.client.cli", "interlingua.v1.points_pb2"} <= set(graph)
    assert "interlingua.server.pipeline" in graph["interlingua.server.engine"]
    assert "interlingua.server.collection" not in graph["interlingua.server.pipeline"]  # TYPE_CHECKING only


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)
