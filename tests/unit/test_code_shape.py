"""The shape of the code a newcomer reads (issue 25): no function in core/, ui/ or pages/ runs over
100 lines, so each one can be read and changed as a whole."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "ui", "pages")
MAX_FUNCTION_LINES = 100


def _sources() -> list[Path]:
    return sorted(p for d in PACKAGES for p in (ROOT / d).rglob("*.py"))


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_sources_found():
    assert len(_sources()) > 20, "the scan must see the project's modules"


def test_no_function_over_100_lines():
    long = []
    for path in _sources():
        for fn in _functions(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}::{fn.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(long)

