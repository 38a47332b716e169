"""The package's import graph: no module imports itself back through others, and no module reaches for
another's underscore names (shared code gets a public name in a module of its own)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tokenreduce"


def module_name(path: str) -> str:
    """`pkg/a/b.py` -> `pkg.a.b`; `pkg/a/__init__.py` -> `pkg.a`."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_test(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "TYPE_CHECKING") or (
        isinstance(node, ast.Attribute) and node.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, type_checking: bool = False):
    """(import node, whether it sits under `if TYPE_CHECKING:`) for every import at any depth."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, type_checking
        elif isinstance(child, ast.If) and _type_checking_test(child.test):
            for node in child.body:
                yield from _imports(ast.Module(body=[node], type_ignores=[]), True)
            for node in child.orelse:
                yield from _imports(ast.Module(body=[node], type_ignores=[]), type_checking)
        else:
            yield from _imports(child, type_checking)


def import_graph(sources: dict[str, str]):
    """From {path: source} of one package's files: the module graph {module: {imported modules}}
    (imports under `if TYPE_CHECKING:` left out) and every `from <module> import _name` naming
    another module of the package, as (importer, imported module, name)."""
    modules = {module_name(path): path for path in sources}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    private: list[tuple[str, str, str]] = []
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node, type_checking in _imports(ast.parse(sources[path], filename=path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name in modules]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in modules:  # `from pkg.a import b` where b is a module
                        targets.append(submodule)
                    elif base in modules:
                        targets.append(base)
                        if alias.name.startswith("_") and not alias.name.startswith("__") and base != name:
                            private.append((name, base, alias.name))
            if not type_checking:
                graph[name].update(t for t in targets if t != name)
    return graph, private


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) through each strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for group in groups:
        start = min(group)
        # breadth-first from start back to start within the group: a shortest cycle through it
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            nxt_frontier = []
            for node in frontier:
                for nxt in sorted(graph[node] & group):
                    if nxt not in previous:
                        previous[nxt] = node
                        nxt_frontier.append(nxt)
            frontier = nxt_frontier
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append(path[::-1])
    return cycles


def package_sources() -> dict[str, str]:
    root = PACKAGE.parent
    return {path.relative_to(root).as_posix(): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


# --- the package -----------------------------------------------------------------------------------
def test_no_import_cycles():
    graph, _ = import_graph(package_sources())
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_underscore_names_imported_across_modules():
    _, private = import_graph(package_sources())
    assert not private, "underscore names imported from other modules:\n" + "\n".join(
        f"{importer}: from {module} import {name}" for importer, module, name in private)


def test_the_package_is_read():
    graph, _ = import_graph(package_sources())
    assert "tokenreduce.core.contract" in graph["tokenreduce.reducers.base"]
    assert "tokenreduce.adapters.blocks" in graph["tokenreduce.adapters.timm_vit"]
    # imports inside functions count: the DiffRate search imports the adapters' registry in one
    assert "tokenreduce.reducers" in graph["tokenreduce.search.schedule"]


# --- the checker, on made-up packages --------------------------------------------------------------
def test_checker_finds_a_cycle_through_a_function_level_import():
    graph, _ = import_graph({
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import f\n",
        "pkg/b.py": "def f():\n    from .c import g\n",
        "pkg/c.py": "import pkg.a\n",
    })
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_checker_resolves_submodules_and_relative_imports():
    graph, _ = import_graph({
        "pkg/__init__.py": "from pkg import sub\n",
        "pkg/sub/__init__.py": "from . import x\nfrom .y import thing\n",
        "pkg/sub/x.py": "from ..z import name\n",
        "pkg/sub/y.py": "",
        "pkg/z.py": "from pkg.sub import y\n",
    })
    assert graph == {
        "pkg": {"pkg.sub"},
        "pkg.sub": {"pkg.sub.x", "pkg.sub.y"},
        "pkg.sub.x": {"pkg.z"},
        "pkg.sub.y": set(),
        "pkg.z": {"pkg.sub.y"},
    }
    assert find_cycles(graph) == []


def test_checker_leaves_type_checking_imports_out_of_cycles():
    graph, _ = import_graph({
        "pkg/__init__.py": "",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "pkg/b.py": "from pkg.a import A\n",
    })
    assert find_cycles(graph) == []


def test_checker_finds_an_underscore_import():
    _, private = import_graph({
        "pkg/__init__.py": "",
        "pkg/a.py": "_x = 1\n__all__ = []\n",
        "pkg/b.py": "from pkg.a import __all__, _x\nfrom os import _exit\n",
        "pkg/c.py": "def f():\n    from .a import _x as y\n",
    })
    assert private == [("pkg.b", "pkg.a", "_x"), ("pkg.c", "pkg.a", "_x")]


def test_checker_passes_a_clean_package():
    graph, private = import_graph({
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "import os\nfrom pkg.b import g\n",
        "pkg/b.py": "def g():\n    import json\n",
    })
    assert find_cycles(graph) == [] and private == []
