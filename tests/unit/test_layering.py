"""The package layering of docs/architecture.md, checked on the source: who may import whom.

    models  <-  heads, data  <-  evaluation  <-  trainer

`models/` is the bottom (the registry, the error family, the weights loader) and imports nothing above it;
`data/`, `heads/` and `evaluation/` never import `trainer/`; the training loop asks `data` for its input pipeline
and names no dataset, loader or decoder class itself. Imports inside functions count too.
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
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
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
    assert imported_modules(source) == {"os", "trainer.loop"}
