"""The package layering of docs/architecture.md, checked on the source: who may import whom.

    models  <-  heads, data  <-  evaluation  <-  trainer

`models/` is the bottom (the registry, the error family, the weights loader) and imports nothing above it;
`data/`, `heads/` and `evaluation/` never import `trainer/`; the training loop asks `data` for its input pipeline
and names no dataset, loader or decoder class itself. And no module imports itself through others: no import cycle
among the project's modules. Imports inside functions (and under `TYPE_CHECKING`) count too: they hide a cycle,
they do not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.launching import REPO

PACKAGES = ("models", "heads", "data", "evaluation", "trainer")
FORBIDDEN = {
    "models": {"heads", "data", "evaluation", "trainer"},
    "heads": {"data", "evaluation", "trainer"},
    "data": {"heads", "evaluation", "trainer"},
    "evaluation": {"trainer", "heads"},
}
# What the input pipeline is made of: only `data` itself chooses among these.
DATA_INTERNALS = {
    "data.dataset",
    "data.image_folder",
    "data.recordio",
    "data.loader",
    "data.synthetic",
    "data.gpu_decode",
}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (`from a.b import c` counts `a.b`, and `a.b.c` too: c may be a
    module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """The project's modules and, for each, the project modules it imports."""
    paths = {module_name(path): path for package in PACKAGES for path in sources(package)}
    return {name: (imported_modules(path) & paths.keys()) - {name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_it(package: str) -> None:
    offending = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in sources(package)
        for module in sorted(imported_modules(path))
        if module.split(".")[0] in FORBIDDEN[package]
    ]
    assert not offending, offending


def test_the_trainer_names_no_dataset_class() -> None:
    for name in ("loop.py", "main.py"):
        modules = imported_modules(REPO / "trainer" / name)
        assert not modules & DATA_INTERNALS, (name, modules & DATA_INTERNALS)
        assert "data" in modules or name == "main.py"  # the loop's input comes from `data` alone


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from trainer.loop import run\n    return run\n")
    assert imported_modules(source) == {"os", "trainer.loop", "trainer.loop.run"}


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert {"trainer.loop", "heads.registry", "evaluation.embed", "models.run_folder"} <= graph.keys()
    assert "heads.config" in graph["heads.registry"] and "trainer.reporting" in graph["trainer.loop"]
    assert not cycles(graph), cycles(graph)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    source = tmp_path / "m.py"
    source.write_text(
        "from __future__ import annotations\nfrom typing import TYPE_CHECKING\n\n"
        "if TYPE_CHECKING:\n    from trainer.loop import Trainer\n"
    )
    assert "trainer.loop" in imported_modules(source)
