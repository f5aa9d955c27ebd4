"""Every stable reason code can be found from its name: in ENVELOPE.md's verdict table, in the development guide's
index of checks, and in a unit test that trips it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from byzguard.verdict import Code

REPO = Path(__file__).resolve().parents[2]
UNIT_TESTS = "\n".join(p.read_text() for p in sorted((REPO / "tests" / "unit").glob("test_*.py"))
                       if p.name != Path(__file__).name)


def _table_codes(text: str) -> set[str]:
    return set(re.findall(r"`([a-z_]+\.[a-z_*]+)`", text))


@pytest.mark.parametrize("code", list(Code), ids=str)
def test_every_code_is_in_the_envelope_verdict_table(code: Code) -> None:
    """ENVELOPE.md's verdict table has a row for the code."""
    table = (REPO / "ENVELOPE.md").read_text().split("## Verdict codes", 1)[1]
    assert f"| `{code.value}` |" in table


@pytest.mark.parametrize("code", list(Code), ids=str)
def test_every_code_is_in_the_development_index(code: Code) -> None:
    """docs/development.md's index of checks names the code, or its family with a wildcard."""
    index = (REPO / "docs" / "development.md").read_text().split("## Finding a check from its code", 1)[1]
    index = index.split("\n## ", 1)[0]
    named = _table_codes(index)
    assert code.value in named or f"{code.value.split('.')[0]}.*" in named


@pytest.mark.parametrize("code", list(Code), ids=str)
def test_every_code_is_tripped_by_a_unit_test(code: Code) -> None:
    """Some unit test names the code (as text or as `Code.<NAME>`), so a change of its behaviour fails a test."""
    assert code.value in UNIT_TESTS or f"Code.{code.name}" in UNIT_TESTS
