"""The package's import graph: no cycles, and no import from a lower layer to a higher one.

Every ``import`` counts, wherever it is written (module level, inside a function, under ``TYPE_CHECKING``):
a lazy import keeps ``--help`` fast but is still a dependency.  Layers, top to bottom::

    commands   cli, launcher, tab_options, jobs/, gui/
    training   training/
    science    model/, analysis/
    io         relion/, parallel/
    imaging    imaging/            (imports nothing of ours)
    base       errors, logs, the package root, data/   (import nothing of ours)

A module may import its own layer or any layer below; the import graph (own layer included) has no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import relion_dynamight

PACKAGE = Path(relion_dynamight.__file__).parent
LAYERS = {
    "cli": 5, "launcher": 5, "tab_options": 5, "jobs": 5, "gui": 5,
    "training": 4,
    "model": 3, "analysis": 3,
    "relion": 2, "parallel": 2,
    "imaging": 1,
    "errors": 0, "logs": 0, "data": 0, "": 0,
}


def module_files() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in modules and c != name)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def top(module: str) -> str:
    """``relion_dynamight.relion.star`` → ``relion``; the package root → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(module: str) -> int:
    key = top(module)
    assert key in LAYERS, f"{module}: not in any layer; add '{key}' to LAYERS in {__file__}"
    return LAYERS[key]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    edges = graph()
    assert len(edges) > 60
    assert "relion_dynamight.relion.star" in edges["relion_dynamight.relion.particles"]
    assert "relion_dynamight.jobs.runner" in edges["relion_dynamight.cli"]      # a lazy import inside a function


def test_the_checker_sees_cycles_and_upward_imports() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer("relion_dynamight.jobs.explore") > layer("relion_dynamight.training.half") > layer(
        "relion_dynamight.model.decoder") > layer("relion_dynamight.relion.star") > layer(
        "relion_dynamight.imaging.ctf") > layer("relion_dynamight.errors")


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    upward = [f"{a} -> {b}" for a, targets in sorted(graph().items()) for b in sorted(targets)
              if layer(b) > layer(a)]
    assert upward == []


def test_imaging_and_base_import_nothing_of_ours() -> None:
    own = [f"{a} -> {b}" for a, targets in sorted(graph().items()) for b in sorted(targets)
           if layer(a) <= 1 and top(b) != top(a)]
    assert own == []
