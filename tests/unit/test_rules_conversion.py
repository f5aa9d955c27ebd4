"""Values as CEL values (byzguard.rules.conversion): the fast paths' shortcuts convert as celpy's activation does."""

from __future__ import annotations

from typing import Any

import pytest
from celpy.celtypes import TimestampType
from hypothesis import given, settings
from hypothesis import strategies as st

from byzguard.rules import RuleSpec, compile_rules, conversion
from tests.unit.rules_cases import NOW


@settings(max_examples=200, deadline=None)
@given(now=st.floats(min_value=-6e10, max_value=2.5e11))
def test_fast_now_matches_celpy(now: float) -> None:
    """The fast path's `now` is the very timestamp celpy's activation holds."""
    fast, reference = conversion._fast_now(now), conversion._now(now)
    assert type(fast) is TimestampType and fast == reference and fast.tzinfo is reference.tzinfo


def test_plain_json_matches_conversion() -> None:
    """JSON the fast path reads as parsed is exactly JSON `_to_cel` converts; anything else is converted."""
    limit = 2**1024 - 2**970
    assert conversion._plain_json({"a": [limit - 1]}) and float(limit - 1) > 0
    assert not conversion._plain_json({"a": [limit]})
    with pytest.raises(OverflowError):
        float(limit)
    for odd in ({1: 2}, (1, 2), b"x", {"a": {"b": object()}}):
        assert not conversion._plain_json(odd)
    deep: Any = 1.0
    for _ in range(40):
        deep = [deep]
    assert not conversion._plain_json(deep)  # converted instead: slower, same answers
    assert compile_rules([RuleSpec("deep", "size(data) == 1")]).evaluate(deep, None, now=NOW, event={}) == []
