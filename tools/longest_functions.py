"""Print the longest functions of the project (AST line spans, docstring included).

    python tools/longest_functions.py [--top N] [PATH ...]   (default: regcore sweeps analysis)

One line per function: lines, `path:line`, qualified name. Nested functions are listed on
their own and also count inside their enclosing function.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATHS = ("regcore", "sweeps", "analysis")


def functions(path: Path):
    """(lines, line, qualified name) of every function and method in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield child.end_lineno - child.lineno + 1, child.lineno, name
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS))
    parser.add_argument("--top", type=int, default=15, help="how many to print")
    args = parser.parse_args(argv)
    rows = []
    for name in args.paths:
        base = Path(name) if Path(name).is_absolute() else ROOT / name
        if not base.exists():
            print(f"error: {name} does not exist", file=sys.stderr)
            return 2
        files = [base] if base.is_file() else sorted(base.rglob("*.py"))
        for file in files:
            for lines, line, qualname in functions(file):
                rows.append((lines, f"{file.relative_to(ROOT)}:{line}", qualname))
    for lines, where, qualname in sorted(rows, key=lambda r: (-r[0], r[1]))[:args.top]:
        print(f"{lines:5d}  {where:40s} {qualname}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
