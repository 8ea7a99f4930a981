"""No import cycle inside flagm3: every import counts, also one inside a function (lazy) or under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "flagm3"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` from the source of every ``.py`` file under ``root``.

    ``import a.b``, ``from a.b import c`` and relative imports all count, wherever they stand (module level,
    inside a function, under ``if TYPE_CHECKING:``); ``from a import b`` where ``a.b`` is a module counts as
    importing ``a.b`` only.
    """
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                submodules = {f"{source}.{alias.name}" for alias in node.names} & set(files)
                targets.update(submodules)
                if len(submodules) < len(node.names):  # names defined in ``source`` itself
                    targets.add(source)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(graph, set(group)) for group in groups]


def _cycle_through(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest import path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected group


def test_the_checker_finds_lazy_and_type_checking_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")  # lazy
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n")
    (pkg / "c.py").write_text("from . import sub\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("from ..c import x\n")
    (pkg / "sub" / "e.py").write_text("from .. import c\nimport os\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.sub"},
                     "pkg.sub": set(), "pkg.sub.d": {"pkg.c"}, "pkg.sub.e": {"pkg.c"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    (pkg / "sub" / "__init__.py").write_text("from .d import y\n")  # pkg.c -> pkg.sub -> pkg.sub.d -> pkg.c
    assert find_cycles(import_graph(pkg)) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.sub", "pkg.sub.d", "pkg.c"]]


def test_no_import_cycle_in_flagm3():
    graph = import_graph(PACKAGE)
    assert "flagm3.evaluation.retrieval" in graph and "flagm3.modeling_m3" in graph["flagm3.inference"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in flagm3: " + "; ".join(" -> ".join(c) for c in cycles)


def test_architecture_page_maps_every_module():
    """docs/architecture.md names every module of flagm3 (a package's modules may be named in its row)."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for name in sorted(import_graph(PACKAGE)):
        parent, _, leaf = name.rpartition(".")
        if name == "flagm3" or f"`{name}`" in text:
            continue
        if parent != "flagm3" and f"`{parent}`" in text and f"`{leaf}`" in text:
            continue
        missing.append(name)
    assert not missing, f"docs/architecture.md does not map {missing}"
