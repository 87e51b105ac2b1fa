"""The package's shape, read statically (``ast``; nothing is imported): the import graph has no
cycle, the library never imports the book's machinery (``gemma2_lite.book``), no function is
longer than :data:`MAX_FUNCTION_LINES` and no module than :data:`MAX_MODULE_LINES`, and no
module imports another's private (``_name``) names (issue 20 item 5).

Imports inside functions count too: a lazy import hides a cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gemma2_lite"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name ``from ... import`` reads from, inside module ``module``."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(package module imported, names taken from it, line) for every import in ``module``."""
    found = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if source not in MODULES:
                continue
            names = []
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:  # `from pkg import module`
                    found.append((f"{source}.{alias.name}", [], node.lineno))
                else:
                    names.append(alias.name)
            if names and MODULES[source].name != "__init__.py":
                found.append((source, names, node.lineno))
    return found


GRAPH = {m: {target for target, _, _ in _imports(m) if target != m} for m in MODULES}


def _cycles() -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
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

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_imports_it_should() -> None:
    """The reader works: known edges are found (a parser that saw nothing would pass all)."""
    assert "gemma2_lite.attention" in GRAPH["gemma2_lite.model"]  # relative
    assert "gemma2_lite.model" in GRAPH["gemma2_lite.book.experiments"]  # absolute
    assert "gemma2_lite.book.seed_records" in GRAPH["gemma2_lite.book.experiments"]
    assert "gemma2_lite.fixtures" in GRAPH["gemma2_lite.weights"]  # from . import


def test_the_import_graph_has_no_cycle() -> None:
    assert _cycles() == [], "modules that import each other (directly or around a loop)"


def test_the_library_never_imports_the_books_machinery() -> None:
    wrong = sorted(
        (m, t)
        for m, targets in GRAPH.items()
        if not m.startswith("gemma2_lite.book")
        for t in targets
        if t.startswith("gemma2_lite.book")
    )
    assert wrong == [], "library modules importing gemma2_lite.book"


def test_no_private_name_is_imported_from_another_module() -> None:
    wrong = [
        f"{m}:{line} takes {name} from {source}"
        for m in MODULES
        for source, names, line in _imports(m)
        if source != m
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert wrong == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_stay_short(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines (at most {MAX_MODULE_LINES})"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(TREES[module])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == [], f"{module}: functions over {MAX_FUNCTION_LINES} lines"
