"""Every third-party module that `service/` and `workers/` import is a declared runtime dependency.

`make serve` installs only `[project] dependencies`; the test extras (mergekit, schemathesis, ...) pull in
more (scipy among them), so a module the product imports but does not declare works in the test venv and
fails on a fresh clone (the README walk found profile jobs failing with "No module named 'scipy'").
Imports are read from the source (every `import` and `from ... import`, lazy ones inside functions
included) and mapped to the distributions that provide them in this environment.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "workers")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for requirement in project["dependencies"]:
        names.add(_normalise(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]))
    return names


def imported_top_level_modules(source_dirs: list[Path]) -> dict[str, str]:
    """Top-level module name -> first file importing it, over every .py file (absolute imports only)."""
    found: dict[str, str] = {}
    for directory in source_dirs:
        for path in sorted(directory.rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(directory.parent)))
    return found


def undeclared_imports(source_dirs: list[Path], declared: set[str]) -> dict[str, str]:
    """Imported third-party modules none of whose providing distributions is declared -> importing file."""
    providers = metadata.packages_distributions()
    missing = {}
    for module, where in imported_top_level_modules(source_dirs).items():
        if module in sys.stdlib_module_names or module in PACKAGES or module == "__future__":
            continue
        distributions = {_normalise(d) for d in providers.get(module, [])}
        if not distributions:
            missing[module] = f"{where} (no installed distribution provides it)"
        elif not distributions & declared:
            missing[module] = f"{where} (from {', '.join(sorted(distributions))})"
    return missing


def test_every_imported_module_is_a_declared_dependency():
    missing = undeclared_imports([ROOT / p for p in PACKAGES], _declared())
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def test_the_check_sees_lazy_imports_inside_functions(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text("import json\n\ndef fit():\n    from scipy.optimize import nnls\n")
    assert set(imported_top_level_modules([package])) == {"json", "scipy"}
    assert "scipy" in undeclared_imports([package], {"numpy"})
    assert "scipy" not in undeclared_imports([package], {"scipy"})
