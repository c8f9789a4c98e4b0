"""The shape of the code: the import graph of ``src/signpost``, read from the source with ``ast`` (nothing imported).

Every import counts, including the lazy ones inside functions and those under ``TYPE_CHECKING``: a circle made of
lazy imports still ties two modules into one. Run this file as a script to print the circles it finds.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "signpost"
STAGES, CLI = f"{PACKAGE}.stages", f"{PACKAGE}.cli"
ANY_STAGE = "*"

# Stages meet at artifacts: the only stage -> stage imports are from drivers that run another stage as a whole.
ALLOWED_STAGE_IMPORTS: dict[str, set[str]] = {
    # The chain (`signpost run`): prepare -> train -> evaluate/promote -> optimize -> bench -> package, each called.
    f"{STAGES}.pipeline": {ANY_STAGE},
    # The traffic simulator runs the monitor stage on the traffic it made, and the feedback stage on its labels.
    f"{STAGES}.simulate": {f"{STAGES}.monitor", f"{STAGES}.feedback"},
    # Promotion scores the champion with the evaluate stage as a whole before the gate compares the two.
    f"{STAGES}.promote": {f"{STAGES}.evaluate"},
}

# The floors (ARCHITECTURE.md), lowest first: a module imports from its own floor and the floors below, never above.
# Every module stands on one; a module named more precisely than its package (``serve.predlog``: the prediction log's
# store, read by monitoring) stands where that longer name puts it.
FLOORS: list[tuple[str, ...]] = [
    # Foundations: the package's own constants, the config, signatures, artifact folders, the typed files, the machine.
    (PACKAGE, f"{PACKAGE}.config", f"{PACKAGE}.signing", f"{PACKAGE}.artifacts", f"{PACKAGE}.contracts",
     f"{PACKAGE}.machine"),
    # Libraries the stages share: data, models, tracking and the registry, metrics, the client, reports, monitoring.
    (f"{PACKAGE}.data", f"{PACKAGE}.models", f"{PACKAGE}.tracking", f"{PACKAGE}.registry", f"{PACKAGE}.metrics",
     f"{PACKAGE}.client", f"{PACKAGE}.report", f"{PACKAGE}.monitoring", f"{PACKAGE}.serve.predlog",
     f"{PACKAGE}.k8s"),
    # Engines: training, loading and running any model form, making variants, one bench cell, the HTTP service, the
    # device agent.
    (f"{PACKAGE}.training", f"{PACKAGE}.runtime", f"{PACKAGE}.optimize", f"{PACKAGE}.bench_worker",
     f"{PACKAGE}.serve", f"{PACKAGE}.edge"),
    (STAGES,),
    (CLI,),
]


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


def _within(module: str, prefix: str) -> bool:
    """Whether ``module`` is ``prefix`` or inside it (``signpost.data.cache`` is within ``signpost.data``)."""
    return module == prefix or module.startswith(f"{prefix}.")


def forbidden_stage_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every (stage, stage it imports) that ``ALLOWED_STAGE_IMPORTS`` does not allow."""
    found = []
    for source in sorted(graph):
        allowed = ALLOWED_STAGE_IMPORTS.get(source, set())
        if not source.startswith(f"{STAGES}.") or ANY_STAGE in allowed:
            continue
        found += [(source, target) for target in sorted(graph[source])
                  if target.startswith(f"{STAGES}.") and target not in allowed]
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every (module, module it imports) where the first is below the stages and the second a stage or the CLI."""
    def top(module: str) -> bool:
        return _within(module, STAGES) or _within(module, CLI)

    return [(source, target) for source in sorted(graph) if not top(source) for target in sorted(graph[source])
            if top(target)]


def floor(module: str) -> int | None:
    """The floor of ``module``: that of the longest name in ``FLOORS`` it is or is inside (the package root only by
    its own name); None when no floor names it."""
    named = [(len(name), i) for i, names in enumerate(FLOORS) for name in names
             if module == name or (name != PACKAGE and _within(module, name))]
    return max(named)[1] if named else None


def floor_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every (module, module it imports) where the second stands on a higher floor of ``FLOORS`` than the first."""
    found = []
    for source in sorted(graph):
        own = floor(source)
        if own is not None:
            found += [(source, target) for target in sorted(graph[source]) if (floor(target) or 0) > own]
    return found


def _edges(found: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {source} -> {target}" for source, target in found)


def test_the_stage_check_allows_the_drivers_only() -> None:
    """The checker itself, on a made-up graph: a driver's allowed edge passes, a stage using another's parts not."""
    graph = {
        f"{STAGES}.pipeline": {f"{STAGES}.train", f"{STAGES}.bench"},
        f"{STAGES}.promote": {f"{STAGES}.evaluate", f"{STAGES}.train"},
        f"{STAGES}.optimize": {f"{STAGES}.train", f"{PACKAGE}.training"},
        f"{PACKAGE}.training": {f"{PACKAGE}.config"},
        f"{PACKAGE}.serve.app": {f"{STAGES}.evaluate"},
        f"{PACKAGE}.config": {f"{PACKAGE}.training"},
    }
    assert forbidden_stage_imports(graph) == [(f"{STAGES}.optimize", f"{STAGES}.train"),
                                              (f"{STAGES}.promote", f"{STAGES}.train")]
    assert upward_imports(graph) == [(f"{PACKAGE}.serve.app", f"{STAGES}.evaluate")]
    assert floor_violations(graph) == [(f"{PACKAGE}.config", f"{PACKAGE}.training"),
                                       (f"{PACKAGE}.serve.app", f"{STAGES}.evaluate")]
    assert floor(PACKAGE) == 0 and floor(f"{PACKAGE}.serve.predlog") == 1 and floor(f"{PACKAGE}.serve.app") == 2
    assert floor(f"{PACKAGE}.serve.predlog_writer") == 2 and floor("elsewhere") is None


def test_no_stage_imports_another_stage_except_the_drivers() -> None:
    graph = import_graph()
    stages = {name for name in graph if name.startswith(f"{STAGES}.")}
    assert len(stages) >= 10, f"found only {sorted(stages)} under {SRC}"
    named = (set(ALLOWED_STAGE_IMPORTS) | set().union(*ALLOWED_STAGE_IMPORTS.values())) - {ANY_STAGE}
    assert named <= stages, f"ALLOWED_STAGE_IMPORTS names modules that are gone: {sorted(named - stages)}"
    found = forbidden_stage_imports(graph)
    assert not found, ("a stage imports another stage's internals (stages meet at artifacts: move the shared piece "
                       "below the stages, as signpost.training, or allow a driver in ALLOWED_STAGE_IMPORTS):\n"
                       + _edges(found))


def test_every_module_stands_on_a_floor() -> None:
    unplaced = sorted(name for name in import_graph() if floor(name) is None)
    assert not unplaced, f"modules on no floor (add them to FLOORS and ARCHITECTURE.md): {unplaced}"


def test_nothing_below_the_stages_imports_a_stage_or_the_cli() -> None:
    graph = import_graph()
    assert f"{PACKAGE}.training" in graph and CLI in graph
    found = upward_imports(graph)
    assert not found, "modules below the stages import a stage or the CLI (move the piece they need down):\n" + _edges(
        found)
    found = floor_violations(graph)
    assert not found, "modules import from a higher floor (see FLOORS; move the piece they need down):\n" + _edges(
        found)


if __name__ == "__main__":
    for circle in cycles(import_graph()):
        print(" -> ".join(circle))
