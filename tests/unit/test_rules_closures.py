"""The closures (byzguard.rules.closures): compiled rules agree with celpy, errors and hand-overs included."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from byzguard.rules import RuleSpec, compile_rules
from byzguard.rules.ruleset import _celpy_only
from byzguard.verdict import Code, Severity
from tests.unit.rules_cases import (
    CELPY_CORPUS,
    DATA,
    EVENT,
    FAST_CORPUS,
    NOW,
    PRICE_POSITIVE,
    SEED_RULES,
    codes,
    fast_outcomes,
    outcomes_of,
    price,
    run,
)


def test_seed_rules_take_the_fast_path() -> None:
    """The seed's four rules, and the whole differential corpus, compile to closures; macros do not."""
    assert compile_rules(SEED_RULES).compiled_fast == tuple(spec.name for spec in SEED_RULES)
    assert FAST_CORPUS.compiled_fast == FAST_CORPUS.names
    assert CELPY_CORPUS.compiled_fast == ()
    outside = compile_rules([RuleSpec("macro", "data.items.all(i, i.qty > 0)"),
                             RuleSpec("type", "type(data.price) == double"),
                             RuleSpec("variable_map", "{'a': data.price}.a > 0"), PRICE_POSITIVE])
    assert outside.compiled_fast == ("price_positive",)
    assert outside.evaluate({"items": [{"qty": 1}], "price": 1}, None, now=NOW, event=EVENT) == []


def disguised(value: Any) -> Any:
    """The same JSON in other containers: rules see the same values, but the fast path reads celpy's
    conversion of them rather than the parsed JSON itself."""
    if isinstance(value, dict):
        return OrderedDict((key, disguised(item)) for key, item in value.items())
    if isinstance(value, list):
        return tuple(disguised(item) for item in value)
    return value


@settings(max_examples=150, deadline=None)
@given(data=DATA, last=st.none() | DATA, disguise=st.booleans())
def test_fast_path_agrees_with_celpy(data: Any, last: Any, disguise: bool) -> None:
    """On random JSON, every corpus rule has the same outcome (pass/violated/error) on both paths."""
    if disguise:
        data, last = disguised(data), disguised(last)
    names = FAST_CORPUS.names
    reference = outcomes_of(CELPY_CORPUS.evaluate(data, last, now=NOW, event=EVENT), names)
    assert outcomes_of(FAST_CORPUS.evaluate(data, last, now=NOW, event=EVENT), names) == reference
    # The closures alone, where they decide (rather than hand over to celpy), must decide alike.
    decided = {name: outcome for name, outcome in fast_outcomes(FAST_CORPUS, data, last).items()
               if outcome != "bail"}
    assert decided == {name: reference[name] for name in decided}


@pytest.mark.parametrize(
    ("data", "last"),
    [(price(), price(49.5)), (price(0.01), price(49.99)), (price(), None), ({"currency": "USD"}, None),
     (price(currency="usd", age_s=25 * 3600), price("1")), ({"price": None, "lastUpdated": "yesterday"}, None),
     ([1, 2], "text")],
)
def test_seed_rules_are_decided_without_celpy(data: Any, last: Any) -> None:
    """On price events, good or bad, the seed rules' closures decide themselves, as celpy would."""
    rules = compile_rules(SEED_RULES)
    reference = outcomes_of(_celpy_only(rules).evaluate(data, last, now=NOW, event=EVENT), rules.names)
    assert fast_outcomes(rules, data, last) == reference


def test_fast_errors_explain_themselves() -> None:
    """Errors found by the closures say what went wrong, and keep the rule's severity."""
    cases = {
        "data.price > 0": ({"currency": "USD"}, "missing field 'price'"),
        "data.tags[3] == 'a'": ({"tags": ["a"]}, "index 3 out of range"),
        "data['x'] == 1": ({}, "no such key 'x'"),
        "data.price > 0 ": ({"price": "49.99"}, "no matching overload for string > int"),
        "size(data.tags) / size(data.none) > 1": ({"tags": [1], "none": []}, "division by zero"),
        "data.price": ({"price": 1}, "result is double, not bool"),
        "timestamp(data.t) < now": ({"t": "yesterday"}, "cannot parse timestamp 'yesterday'"),
    }
    for expr, (data, fragment) in cases.items():
        [reason] = run(RuleSpec("r", expr, Severity.WARN), data)
        assert reason.code is Code.INVARIANT_ERROR and reason.severity is Severity.WARN
        assert fragment in reason.detail, reason.detail


def test_crashes_are_not_absorbed() -> None:
    """celpy lets int() of an infinity crash rather than yield an error `||` could absorb; so does the fast
    path, which hands such events over to celpy."""
    rules = compile_rules([RuleSpec("crash", "true || int(data.x) > 0")])
    assert rules.compiled_fast == ("crash",)
    assert codes(rules.evaluate({"x": math.inf}, None, now=NOW, event=EVENT)) == [Code.INVARIANT_ERROR]
    assert rules.evaluate({"x": 1.5}, None, now=NOW, event=EVENT) == []


@pytest.mark.parametrize(
    ("expr", "data", "code"),
    [("data.flag + 1 == 2", {"flag": True}, None),  # celpy adds bools as Python ints
     ("data.flag < 2", {"flag": True}, None),  # ...and orders them against numbers one way round only
     ("2 > data.flag", {"flag": True}, Code.INVARIANT_ERROR),
     ("data.s * 2 == 'abab'", {"s": "ab"}, Code.INVARIANT_ERROR),  # IntType's __rmul__ refuses
     ("'a' in data.s", {"s": "cat"}, None),
     ("null / data.zero == null", {"zero": 0.0}, Code.INVARIANT_VIOLATED)],
)
def test_celpy_quirks_are_left_to_celpy(expr: str, data: Any, code: Code | None) -> None:
    """Where celpy has a quirk of its own, the closures hand the event over rather than second-guess it."""
    rules = compile_rules([RuleSpec("quirk", expr)])
    assert rules.compiled_fast == ("quirk",)
    assert fast_outcomes(rules, data, None) == {"quirk": "bail"}
    assert codes(rules.evaluate(data, None, now=NOW, event=EVENT)) == ([] if code is None else [code])
    assert codes(_celpy_only(rules).evaluate(data, None, now=NOW, event=EVENT)) == codes(
        rules.evaluate(data, None, now=NOW, event=EVENT))
