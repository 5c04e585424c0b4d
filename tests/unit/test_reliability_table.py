"""The README's "What happens when…" table cannot drift: every test it names exists, every bad-input case is in a
row, and the README's section is exactly what tests/reliability_table.py renders (``make readme-table``)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests import reliability_table as table
from tests.integration.test_bad_inputs import RAY_CASES
from tests.unit.test_bad_inputs import ALONE, CLI_CASES, SPEC_CASES, URLS


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_the_table_names_exists() -> None:
    missing = []
    for row in table.rows():
        assert row.tests, row.when
        for node_id in row.tests:
            file, _, function = node_id.partition("::")
            path = table.ROOT / file
            if not path.is_file() or function not in _test_functions(path):
                missing.append(node_id)
    assert missing == []


def test_every_bad_input_case_is_in_a_row_once() -> None:
    listed = [case for row in table.bad_input_rows() for case in row.cases]
    assert sorted(listed) == sorted([*CLI_CASES, *RAY_CASES, *ALONE, *SPEC_CASES, *URLS])


def test_the_readme_section_is_the_rendered_table() -> None:
    text = table.README.read_text()
    assert table.readme_section(text) == table.render(), "README is stale: run make readme-table"
    assert "a checkpoint cannot be written" in table.render()  # issue 20's last fault row, once untested
