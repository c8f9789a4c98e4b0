"""The shape of the code: the import graph of ``src/signpost``, read from the source with ``ast`` (nothing imported).

Every import counts, including the lazy ones inside functions and those under ``TYPE_CHECKING``: a circle made of
lazy imports still ties two modules into one. Run this file as a script to print the circles it finds.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "signpost"


def module_name(path: Path, src: Path = SRC) -> str:
    """``src/signpost/serve/app.py`` → ``signpost.serve.app``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module → the ``signpost`` modules it imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    files = {module_name(path, src): path for path in sorted((src / PACKAGE).rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: up from this module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (``[a, b, ..., a]``) for every group of modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
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
            visit(node)
    return [_circle(graph, group) for group in groups]


def _circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{sorted(group)} is not a strongly connected group")


def test_the_graph_sees_lazy_relative_and_from_imports(tmp_path: Path) -> None:
    """The checker itself: a circle through a lazy import, a relative import and ``from package import module``."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from signpost.sub import b\n")
    (package / "sub" / "b.py").write_text("from . import c\n")
    (package / "sub" / "c.py").write_text("from ..a import f\nimport os\n")
    (package / "d.py").write_text("import signpost.a\n")
    graph = import_graph(tmp_path)
    assert graph["signpost.a"] == {"signpost.sub.b"}
    assert graph["signpost.sub.b"] == {"signpost.sub.c"}
    assert graph["signpost.sub.c"] == {"signpost.a"}
    assert cycles(graph) == [["signpost.a", "signpost.sub.b", "signpost.sub.c", "signpost.a"]]
    (package / "a.py").write_text("import os\n")
    assert cycles(import_graph(tmp_path)) == []


def test_no_import_cycles_in_src() -> None:
    graph = import_graph()
    assert len(graph) > 30, f"found only {len(graph)} modules under {SRC}"
    found = cycles(graph)
    assert not found, "import circles in src/signpost (move the shared piece below both modules):\n" + "\n".join(
        " -> ".join(circle) for circle in found
    )


if __name__ == "__main__":
    for circle in cycles(import_graph()):
        print(" -> ".join(circle))
