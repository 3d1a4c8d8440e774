"""Imports run one way: `service` may import `workers`, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

WORKERS = Path(__file__).resolve().parent.parent / "workers"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_module_under_workers_imports_the_service_package():
    offenders = {
        str(path.relative_to(WORKERS.parent)): sorted(
            name for name in imported_modules(path) if name == "service" or name.startswith("service.")
        )
        for path in sorted(WORKERS.rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}
    assert len(offenders) > 50  # the scan did read the package
