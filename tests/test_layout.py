"""The package's import graph has no cycle, between files or between lessctl's top-level packages.

Every import counts: at module level, inside functions and under `if TYPE_CHECKING:` (a lazy import hides
a cycle, it does not remove it). Nodes are lessctl's modules (files; a package is its `__init__.py`); at
package level, a node is a top-level module or subpackage of lessctl (`config`, `study`, `ir`, ...).
"""

import ast
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lessctl"


def _module_name(path: Path, root: Path) -> str:
    parts = ("lessctl", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The lessctl modules `name` imports: `import a.b`, `from a import b` (b a module or a name in a), relative."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from a import b`: b is the module a.b when there is one, else a name defined in a.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` where c is a name, not a module, still imports the deepest module on the way.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _package(module: str) -> str:
    """`lessctl.study.plan` -> `study`; `lessctl.config` -> `config`; `lessctl` -> `lessctl`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for source, targets in graph.items():
        edges = packages.setdefault(_package(source), set())
        edges.update(_package(t) for t in targets if _package(t) != _package(source))
    return packages


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each node that is on a cycle, each cycle once (rotated to start at its least node)."""
    seen: set[tuple[str, ...]] = set()
    cycles = []
    for start in sorted(graph):
        parent: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            if start in graph.get(node, ()):
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                cycle = path[::-1]
                i = cycle.index(min(cycle))
                key = tuple(cycle[i:] + cycle[:i])
                if key not in seen:
                    seen.add(key)
                    cycles.append(list(key))
                break
            for nxt in sorted(graph.get(node, ())):
                if nxt not in parent and nxt != start:
                    parent[nxt] = node
                    queue.append(nxt)
    return cycles


def _describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_the_graph_of_lessctl_holds_every_module_and_its_imports():
    graph = _graph()
    assert {"lessctl", "lessctl.config", "lessctl.study.plan", "lessctl.grads.store.reader"} <= graph.keys()
    assert all(target in graph for targets in graph.values() for target in targets)
    assert "lessctl.errors" in graph["lessctl.config"]  # at module level
    assert "lessctl.data.records" in graph["lessctl.ir.beir"]  # inside a function
    assert "lessctl" in graph["lessctl.ir.prepare"]  # `from lessctl import __version__`: the package's __init__
    # commands/__init__.py imports its modules through importlib, by name: not an import statement, no edge.
    assert graph["lessctl.commands"] == set()


def test_cycles_are_found_and_named_once():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == [["x", "y", "z"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    assert _describe([["x", "y", "z"]]) == "x -> y -> z -> x"


def test_imported_resolves_function_level_type_checking_and_relative_imports(tmp_path):
    pkg = tmp_path / "lessctl"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from lessctl.top import Thing\n"
        "def f():\n    from . import b\n    from ..other import name\n"
    )
    (pkg / "sub" / "b.py").write_text("import lessctl.sub.a\n")
    (pkg / "top.py").write_text("")
    (pkg / "other.py").write_text("")
    graph = _graph(pkg)
    assert graph["lessctl.sub.a"] == {"lessctl.top", "lessctl.sub.b", "lessctl.other"}
    assert _cycles(graph) == [["lessctl.sub.a", "lessctl.sub.b"]]


@pytest.mark.parametrize("level", ["file", "package"])
def test_no_import_cycle(level):
    graph = _graph()
    if level == "package":
        graph = _package_graph(graph)
    cycles = _cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s) at {level} level:\n{_describe(cycles)}"
