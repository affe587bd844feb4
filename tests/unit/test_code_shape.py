"""The shape of the code a newcomer reads (issue 25): no function in core/, ui/ or pages/ runs over
100 lines, so each one can be read and changed as a whole; and each page's top level is a short sequence of
named calls (at most 40 lines of statements) that reads like the page."""
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


MAX_PAGE_TOP_LINES = 40


def _top_level_lines(tree: ast.Module) -> int:
    """Lines of a page's top-level statements, leaving out imports, definitions and the docstring: what
    Streamlit runs top to bottom, which should read as a short description of the page."""
    total = 0
    for i, node in enumerate(tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            continue
        total += node.end_lineno - node.lineno + 1
    return total


def test_pages_read_as_a_description_of_the_ui():
    pages = sorted((ROOT / "pages").glob("*.py"))
    assert pages, "the scan must see the pages"
    long = []
    for path in pages:
        lines = _top_level_lines(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        if lines > MAX_PAGE_TOP_LINES:
            long.append(f"{path.relative_to(ROOT)} ({lines} top-level lines)")
    assert not long, (f"pages with more than {MAX_PAGE_TOP_LINES} lines of top-level statements (move blocks into "
                      "named functions): " + ", ".join(long))
