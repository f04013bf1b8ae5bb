"""The project's layering, read from the source (AST, nothing imported): no import cycle among
its modules, no import of another module's private (`_name`) names, regcore imports neither
sweeps nor analysis, and analysis does not import sweeps. Function-level imports count too: a
deferred import still couples the modules."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("regcore", "sweeps", "analysis")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for package in PACKAGES
           for path in sorted((ROOT / package).rglob("*.py"))}


@functools.lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(encoding="utf-8"))


def _resolve(name: str) -> str | None:
    """The project module `name` refers to (itself, or its nearest enclosing package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported project module, the name taken from it or None, line) for every import."""
    tree = _tree(module)
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target:
                    found.append((target, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(prefix + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:  # a submodule
                    found.append((f"{base}.{alias.name}", None, node.lineno))
                elif _resolve(base):
                    found.append((_resolve(base), alias.name, node.lineno))
    return found


def _module_aliases(module: str) -> dict[str, str]:
    """Local names bound to project modules (`import regcore.train as t`, `from regcore import
    evaluate`)."""
    tree = _tree(module)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _graph() -> dict[str, set[str]]:
    return {module: {target for target, _, _ in _imports(module) if target != module}
            for module in MODULES}


def test_the_project_modules_are_found():
    assert {"regcore.train", "regcore.evaluate", "sweeps.ablation", "analysis.report"} <= set(MODULES)


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:  # depth-first; an edge to an open node closes a cycle
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_no_cross_module_private_imports():
    offences = []
    for module in MODULES:
        for target, name, line in _imports(module):
            if name and name.startswith("_") and not name.startswith("__") and target != module:
                offences.append(f"{module}:{line} imports {target}.{name}")
        aliases = _module_aliases(module)
        tree = _tree(module)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                offences.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not offences, offences


@pytest.mark.parametrize("importer, forbidden", [
    ("regcore", "sweeps"), ("regcore", "analysis"), ("analysis", "sweeps")])
def test_layering(importer, forbidden):
    offences = [f"{module}:{line} imports {target}"
                for module in MODULES if module.split(".")[0] == importer
                for target, _, line in _imports(module) if target.split(".")[0] == forbidden]
    assert not offences, offences
