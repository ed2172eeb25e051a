"""The flow in the folders: packages import only the layers below them, so there is no
import cycle between packages. Read from the code with ast (nothing is imported), every
import counted (a late import inside a function is still an edge).

    cli ─► api ─► compress ─► study ─► recipe ─► report ─► stages ─► quant
        ─► prune · distill · export · predict ─► train ─► bench ─► runtime ─► store
        ─► models · data ─► limits · registry · figures · heartbeat · logs ─► errors
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import netshrink

SRC = Path(netshrink.__file__).parent

# Higher imports lower, never the other way; equal ranks do not import each other.
RANKS = {
    "__main__": 12, "cli": 11, "api": 10, "compress": 9.7, "study": 9.5,
    "recipe": 9, "report": 8, "stages": 7, "quant": 6,
    "prune": 5, "distill": 5, "export": 5, "predict": 5,
    "train": 4, "bench": 3, "runtime": 2.5, "store": 2, "models": 1, "data": 1,
    "limits": 0.5, "registry": 0.5, "figures": 0.5, "heartbeat": 0.5, "logs": 0.5,
    "errors": 0,
}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "netshrink" or len(parts) < 2:
        return None
    return parts[1]


def import_edges() -> dict[tuple[str, str], list[str]]:
    """``(from package, to package) -> files`` for every import between two packages."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        me = rel.parts[0].removesuffix(".py")
        if me == "__init__":
            continue  # the package's own front door
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                other = package_of(module)
                if other is not None and other != me:
                    edges[(me, other)].append(str(rel))
    return edges


def cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_packages() -> None:
    assert cycles(import_edges()) == []


def test_every_package_has_a_layer() -> None:
    packages = {p.name.removesuffix(".py") for p in SRC.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert packages - {"__init__"} <= set(RANKS), packages - set(RANKS)


def test_imports_point_down() -> None:
    upward = {f"{a} -> {b}: {', '.join(sorted(set(files)))}"
              for (a, b), files in import_edges().items() if RANKS[a] <= RANKS[b]}
    assert upward == set()


def test_the_check_sees_a_cycle() -> None:
    edges = {("a", "b"): ["a.py"], ("b", "c"): ["b.py"], ("c", "a"): ["c.py"],
             ("c", "d"): ["c.py"]}
    assert cycles(edges) == [["a", "b", "c"]]
