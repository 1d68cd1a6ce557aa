"""The layout rules the tree keeps: small modules, short functions, no history in names.

The import layers themselves are checked by import-linter (`make check`, contracts in
pyproject.toml); these are the rules it cannot express.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("avatars", "engines", "server", "lipstream")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100


def _tracked(*patterns: str) -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.splitlines() if line]


def _product_modules() -> list[Path]:
    return [p for p in _tracked(*(f"{pkg}/*.py" for pkg in PRODUCT)) if p.exists()]


def test_product_modules_are_small() -> None:
    modules = _product_modules()
    assert len(modules) > 40, "the product's modules were not found"
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_product_functions_are_short() -> None:
    long = {}
    for path in _product_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}::{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


HISTORY = re.compile(r"\b(session|issue|round) ?#?\d+\b|\bH\d+:|_s\d{1,2}[-_.]", re.IGNORECASE)


def test_no_development_history_in_names_or_files() -> None:
    """Names of files and the text of code and docs speak of the product, not of how it was
    made: no work-session, issue or round numbers."""
    paths = _tracked("*.py", "*.md", "*.sh", "*.js", "*.html", "Makefile", "bench/results/*")
    assert paths, "no tracked files found"
    bad_names = [str(p.relative_to(ROOT)) for p in paths if HISTORY.search(p.name)]
    assert not bad_names, f"file names with development history: {bad_names}"
    hits = []
    for p in paths:
        if p.suffix in (".json", ".txt") or not p.exists():
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "development history in the text:\n" + "\n".join(hits[:20])
