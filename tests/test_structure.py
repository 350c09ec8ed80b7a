"""The house rules of issue 13, checked: no module in src/ over 400 lines, no function over 80 lines."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FILES = sorted(SRC.rglob("*.py"))


def test_the_source_tree_is_found():
    assert len(FILES) > 40 and (SRC / "regbench" / "train.py") in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_and_function_sizes(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400, f"{path} has {len(text.splitlines())} lines (at most 400)"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{path}: functions over 80 lines: {long}"
