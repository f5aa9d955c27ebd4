"""Values as CEL values (byzguard.rules.conversion): the fast paths' shortcuts convert as celpy's activation does."""

from __future__ import annotations

from typing import Any

import orjson
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


KEYS = st.sampled_from(["a", "b", "price"]) | st.sampled_from([1, True, 1.5, None, 2**70])
LEAVES = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(
    max_size=3) | st.sampled_from([10**400, b"x", object()])
TREES = st.recursive(LEAVES, lambda children: st.lists(children, max_size=3) | st.tuples(children, children)
                     | st.dictionaries(KEYS, children, max_size=3), max_leaves=10)


def converted(value: Any) -> tuple[str, Any]:
    """_to_cel's value (as its repr, in which NaN equals NaN), or the error it raises (type and text)."""
    try:
        return "value", repr(conversion._to_cel(value))
    except Exception as exc:
        return "error", f"{type(exc).__name__}: {exc}"


@settings(max_examples=300, deadline=None)
@given(value=TREES, chain=st.integers(0, 8), levels=st.sampled_from([0, 1, 3]))
def test_deep_containers_convert_as_shallow_ones_do(value: Any, chain: int, levels: int) -> None:
    """Containers nested past the recursion's depth are converted on a stack of their own to the very values
    (and the very first error) the recursion gives."""
    for level in range(chain):
        value = [value] if level % 2 else {"k": value, "n": level}
    reference = converted(value)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conversion, "_RECURSIVE_LEVELS", levels)
        assert converted(value) == reference


def outcome(value: Any) -> str:
    """Whether _to_cel converts value ("value"), or the error it raises (type and text)."""
    try:
        conversion._to_cel(value)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "value"


def test_json_orjson_parses_converts_whatever_the_call_stack() -> None:
    """The deepest JSON orjson parses converts even from deep in a call stack (a recursive conversion would
    run out of it there), and anything deeper is refused the same way wherever it is converted."""
    deepest = orjson.loads(b"[" * 1024 + b"]" * 1024)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(b"[" * 1025 + b"]" * 1025)

    def deep_in_the_stack(frames: int) -> str:
        return outcome([deepest]) if frames == 0 else deep_in_the_stack(frames - 1)

    assert outcome(deepest) == "value"
    assert deep_in_the_stack(800) == "ValueError: nested deeper than 1024 levels"
    assert outcome({"data": deepest}) == "ValueError: nested deeper than 1024 levels"

    def convert_deep_in_the_stack(frames: int) -> str:
        return outcome(deepest) if frames == 0 else convert_deep_in_the_stack(frames - 1)

    assert convert_deep_in_the_stack(800) == "value"
    rules = compile_rules([RuleSpec("price", "data.price > 0")])
    data = {"price": 1.5, "nested": deepest[0]}
    assert rules.evaluate(data, None, now=NOW, event={}, from_orjson=True) == []
    assert rules.evaluate(data, None, now=NOW, event={}) == []
