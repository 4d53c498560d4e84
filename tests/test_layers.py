"""Imports run one way: common <- model <- data_pipeline <- trainer <- slurm. A package imports only
the packages below it (and itself), read from every module's import statements (AST, no imports run),
so a lower layer that reaches up (data_pipeline importing slurm, say) fails here naming the file."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["common", "model", "data_pipeline", "trainer", "slurm"]


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for rank, package in enumerate(LAYERS):
        allowed = set(LAYERS[: rank + 1])
        for path in sorted((REPO / package).rglob("*.py")):
            for name in sorted(_imported_packages(path) - allowed):
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "\n".join(wrong)
