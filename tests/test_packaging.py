"""Packaging metadata: pyproject's license is an SPDX expression (PEP 639) with its text shipped."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_license_is_an_spdx_expression_with_its_file():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^license = "MIT"$', text, flags=re.M), "license must be an SPDX string, not a table"
    assert "MIT License" in (REPO / "LICENSE").read_text()
    # setuptools reads an SPDX license string from 77 on (older ones refuse it)
    assert re.search(r'"setuptools>=(\d+)', text) and int(re.search(r'"setuptools>=(\d+)', text).group(1)) >= 77
