"""The shape of the code a newcomer reads: short modules and functions, and imports that never go round in a circle.

Tests, migrations and benchmark scripts are exempt from the length limits; every import counts for the circles,
including imports under ``TYPE_CHECKING`` and inside functions (a lazy import still ties the two modules).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("yolo_ota", "exporters", "registry", "edge_agent")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if "migrations" in relative.parts:
                continue
            module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
            yield module, path


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for _, p in _sources() if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}, f"split these modules: {long}"


def test_no_function_is_over_60_lines() -> None:
    long: dict[str, int] = {}
    for _, path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert long == {}, f"split these functions: {long}"


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            # the longest known module the name starts with ("a.b.C" -> "a.b" when a.b is a module)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_no_import_cycles() -> None:
    sources = dict(_sources())
    graph = nx.DiGraph()
    for module, path in sources.items():
        graph.add_node(module)
        for target in _imports(module, path, set(sources)):
            if not module.startswith(target + "."):  # a module importing its own package's __init__ is no circle
                graph.add_edge(module, target)
    cycles = sorted(" -> ".join([*c, c[0]]) for c in nx.simple_cycles(graph))
    assert cycles == [], "import cycles:\n" + "\n".join(cycles[:20])
