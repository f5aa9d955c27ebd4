"""Invariant rules in CEL through the RuleSet API: the seed article's price invariants, compile-time refusal,
safe evaluation."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from byzguard.errors import ConfigError, RuleCompileError
from byzguard.rules import RuleSet, RuleSpec, compile_rules
from byzguard.verdict import Code, Severity
from tests.unit.rules_cases import (
    CURRENCY_ISO,
    EVENT,
    FRESH,
    NOW,
    PRICE_CHANGE,
    PRICE_CHANGE_NO_ABS,
    PRICE_POSITIVE,
    SEED_RULES,
    codes,
    price,
    run,
)

# --- the seed's rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [49.99, 50, 0.01])
def test_positive_price_passes(value: float) -> None:
    """A positive price, written as a JSON double or a JSON integer, satisfies `data.price > 0`."""
    assert run(PRICE_POSITIVE, price(value)) == []


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.01])
def test_non_positive_price_is_rejected(value: float) -> None:
    """A zero or negative price violates `data.price > 0` with reject severity, quoting the price."""
    [reason] = run(PRICE_POSITIVE, price(value))
    assert reason.code is Code.INVARIANT_VIOLATED
    assert reason.severity is Severity.REJECT
    assert "price_positive" in reason.detail and "Non-positive price" in reason.detail
    assert f"data.price={value!r}" in reason.detail


def test_iso_currency_passes() -> None:
    """Three upper-case letters satisfy the currency rule."""
    assert run(CURRENCY_ISO, price(currency="USD")) == []


@pytest.mark.parametrize("currency", ["usd", "US", "USDX", "", "U$D"])
def test_malformed_currency_is_rejected(currency: str) -> None:
    """Lower case, too short, too long or non-letter currencies violate `matches("^[A-Z]{3}$")`."""
    [reason] = run(CURRENCY_ISO, price(currency=currency))
    assert reason.code is Code.INVARIANT_VIOLATED and reason.severity is Severity.REJECT
    assert f"data.currency={currency!r}" in reason.detail


@pytest.mark.parametrize("spec", [PRICE_CHANGE, PRICE_CHANGE_NO_ABS])
def test_price_collapse_is_warned(spec: RuleSpec) -> None:
    """The seed's $49.99 -> $0.01 change trips the 50% rule as a warning, not a rejection."""
    [reason] = run(spec, price(0.01), last=price(49.99))
    assert reason.code is Code.INVARIANT_VIOLATED
    assert reason.severity is Severity.WARN
    assert "data.price=0.01" in reason.detail and "last.price=49.99" in reason.detail


@pytest.mark.parametrize("spec", [PRICE_CHANGE, PRICE_CHANGE_NO_ABS])
def test_price_doubling_is_warned(spec: RuleSpec) -> None:
    """A rise of more than 50% trips the rule as well as a fall does."""
    assert codes(run(spec, price(100), last=price(49.99))) == [Code.INVARIANT_VIOLATED]


@pytest.mark.parametrize("spec", [PRICE_CHANGE, PRICE_CHANGE_NO_ABS])
def test_small_price_change_passes(spec: RuleSpec) -> None:
    """$49.99 -> $52 (a JSON integer against a double) is a plausible change."""
    assert run(spec, price(52), last=price(49.99)) == []


@pytest.mark.parametrize("spec", [PRICE_CHANGE, PRICE_CHANGE_NO_ABS])
def test_price_change_without_last_known_good_passes(spec: RuleSpec) -> None:
    """The first price of an entity has nothing to be compared with, so `last == null` lets it pass."""
    assert run(spec, price(0.01), last=None) == []


def test_fresh_price_passes() -> None:
    """Data updated an hour ago is younger than 24 h."""
    assert run(FRESH, price(age_s=3600)) == []


def test_stale_price_is_rejected() -> None:
    """Data updated 25 h ago violates the freshness rule with reject severity."""
    [reason] = run(FRESH, price(age_s=25 * 3600))
    assert reason.code is Code.INVARIANT_VIOLATED and reason.severity is Severity.REJECT
    assert "Stale price data" in reason.detail and "data.lastUpdated=" in reason.detail


def test_seed_rules_together_report_each_failure() -> None:
    """All four seed rules on one bad event give one reason per failed rule, in rule order."""
    reasons = compile_rules(SEED_RULES).evaluate(
        price(0, currency="usd", age_s=25 * 3600), price(49.99), now=NOW, event=EVENT
    )
    assert [r.detail.split("'")[1] for r in reasons] == ["price_positive", "currency_iso", "price_change",
                                                        "fresh"]
    assert [r.severity for r in reasons] == [Severity.REJECT, Severity.REJECT, Severity.WARN, Severity.REJECT]
    assert compile_rules(SEED_RULES).evaluate(price(), price(49.5), now=NOW, event=EVENT) == []


# --- compile-time refusal -----------------------------------------------------------------------------


def test_syntax_error_is_refused_naming_the_rule() -> None:
    """A rule that does not parse is refused at start with a RuleCompileError naming it and the position."""
    with pytest.raises(RuleCompileError) as caught:
        compile_rules([PRICE_POSITIVE, RuleSpec("broken_rule", "data.price > ")])
    assert "broken_rule" in str(caught.value)
    assert "syntax error" in str(caught.value)
    assert isinstance(caught.value, ConfigError)


@pytest.mark.parametrize(
    ("expr", "complaint"),
    [("price > 0", "unknown variable 'price'"),
     ("data.price > lastPrice", "unknown variable 'lastPrice'"),
     ("frobnicate(data.price)", "unknown function 'frobnicate'"),
     ("data.currency.isUpper()", "unknown function or method 'isUpper'")],
)
def test_unknown_names_are_refused(expr: str, complaint: str) -> None:
    """Misspelt variables and functions are refused at compile time instead of erring on every event."""
    with pytest.raises(RuleCompileError, match=complaint):
        compile_rules([RuleSpec("typo", expr)])


def test_macro_variables_and_type_names_are_accepted() -> None:
    """Names bound by macros, type names and has() are not mistaken for unknown variables."""
    rules = compile_rules([
        RuleSpec("all_qty", "data.items.all(i, i.qty > 0)"),
        RuleSpec("typed", "type(data.price) == double && has(data.currency)"),
    ])
    assert rules.evaluate({"items": [{"qty": 1}], "price": 1, "currency": "EUR"}, None, now=NOW,
                          event=EVENT) == []


def test_duplicate_names_and_bad_severity_are_refused() -> None:
    """Two rules with one name, or an unknown severity, are configuration errors."""
    with pytest.raises(RuleCompileError, match="defined twice"):
        compile_rules([PRICE_POSITIVE, PRICE_POSITIVE])
    with pytest.raises(RuleCompileError, match="unknown severity"):
        compile_rules([RuleSpec("r", "true", "loud")])  # type: ignore[arg-type]


def test_empty_expression_is_refused() -> None:
    """A blank expression is refused rather than compiled into a rule that can never run."""
    with pytest.raises(RuleCompileError, match="empty expression"):
        compile_rules([RuleSpec("blank", "  ")])


# --- run-time errors are verdicts, not exceptions -----------------------------------------------------


def test_missing_field_is_an_invariant_error() -> None:
    """Data without the price the rule reads yields invariant.error naming the rule, not an exception."""
    [reason] = run(PRICE_POSITIVE, {"currency": "USD"})
    assert reason.code is Code.INVARIANT_ERROR
    assert reason.severity is Severity.REJECT
    assert "price_positive" in reason.detail and "price" in reason.detail


def test_error_keeps_the_rule_severity() -> None:
    """A warn rule that cannot be evaluated warns: its error has the rule's severity."""
    [reason] = run(PRICE_CHANGE, {"currency": "USD"}, last={"price": 1})
    assert reason.code is Code.INVARIANT_ERROR and reason.severity is Severity.WARN


@pytest.mark.parametrize(
    ("expr", "data"),
    [("data.price", {"price": 1}), ("data.currency", {"currency": "USD"}), ("1 + 1", {}), ("null", {})],
)
def test_non_boolean_result_is_an_invariant_error(expr: str, data: Any) -> None:
    """A rule whose value is not a bool is an error, not silently truthy or falsy."""
    [reason] = run(RuleSpec("not_bool", expr), data)
    assert reason.code is Code.INVARIANT_ERROR
    assert "not bool" in reason.detail


@pytest.mark.parametrize(
    ("data", "fragment"),
    [({"price": "49.99"}, "no matching overload"),
     ({"price": None}, "no matching overload"),
     ([1, 2], "cannot read data.price: data is list, which has no fields"),
     ("text", "cannot read data.price: data is string, which has no fields")],
)
def test_type_mismatch_is_an_invariant_error(data: Any, fragment: str) -> None:
    """A price of the wrong type, or data that is not an object, yields invariant.error."""
    [reason] = run(PRICE_POSITIVE, data)
    assert reason.code is Code.INVARIANT_ERROR
    assert fragment in reason.detail


def test_unparsable_timestamp_is_an_invariant_error() -> None:
    """A lastUpdated that is not RFC 3339 yields invariant.error quoting the text."""
    [reason] = run(FRESH, {"lastUpdated": "yesterday"})
    assert reason.code is Code.INVARIANT_ERROR and "yesterday" in reason.detail


def test_unconvertible_data_is_an_invariant_error_per_rule() -> None:
    """An integer beyond double range can't enter CEL: rules needing that data report invariant.error."""
    reasons = compile_rules(SEED_RULES).evaluate({"price": 10**400}, None, now=NOW, event=EVENT)
    # price_change short-circuits on `last == null` before it touches data, as CEL's `||` does.
    assert codes(reasons) == [Code.INVARIANT_ERROR] * 3
    assert all("cannot use data in rules" in reason.detail for reason in reasons)


def test_unconvertible_last_only_affects_rules_that_read_it() -> None:
    """A last-known-good CEL can't hold fails the rules that read it, and no others."""
    reasons = compile_rules(SEED_RULES).evaluate(price(), {"price": 10**400}, now=NOW, event=EVENT)
    assert codes(reasons) == [Code.INVARIANT_ERROR]
    assert "price_change" in reasons[0].detail and reasons[0].severity is Severity.WARN


def test_odd_envelope_attributes_are_skipped() -> None:
    """Envelope attributes CEL can't hold (raw bytes) are left out rather than failing every rule."""
    event = {**EVENT, "checksum": b"\x00\x01", "lamport": 12}
    spec = RuleSpec("env", "event.lamport == 12 && type(event.lamport) == int && !has(event.checksum)")
    assert run(spec, price(), event=event) == []


# --- the CEL environment --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    ["0 < data.price", "data.qty == 3", "data.qty != 4", "data.qty == 3.0", "data.price * 2 > 99",
     "2 * data.price > 99", "data.qty + 1 == 4", "data.qty in [1, 2, 3]", "data.tags == ['a']",
     "data.missing == null", "data.price != null", "data.price != 'x'", "math.abs(-data.price) == data.price",
     "abs(-3) == 3", "int(data.qty) % 2 == 1", "type(data.qty) == double"],
)
def test_numbers_mix_naturally(expr: str) -> None:
    """JSON numbers are doubles that compare, test equal and compute with int literals as users expect."""
    assert run(RuleSpec("mix", expr), {"price": 49.99, "qty": 3, "tags": ["a"], "missing": None}) == []


@pytest.mark.parametrize("expr", ["true == 1", "data.flag == 1", "[1] == [true]", "{'a': 1} == {'a': '1'}"])
def test_values_of_different_kinds_are_not_equal(expr: str) -> None:
    """Equality across kinds (bool vs number, number vs string) is false: CEL's heterogeneous equality."""
    assert codes(run(RuleSpec("kinds", expr), {"flag": True})) == [Code.INVARIANT_VIOLATED]


def test_envelope_and_last_variables_are_bound() -> None:
    """`event` carries the envelope (time as a timestamp); `has_last` says whether last is known."""
    rules = compile_rules([
        RuleSpec("envelope",
                 "event.version == 7 && event.source == 'pricing-service' && event.subject == 'p-1'"),
        RuleSpec("event_time", "now - event.time < duration('5s') && event.time <= now"),
        RuleSpec("has_last", "has_last == (last != null)"),
        RuleSpec("no_extra", "event.id == 'e-1' && event.type == 'price.updated'"),
    ])
    assert rules.evaluate(price(), None, now=NOW, event=EVENT) == []
    assert rules.evaluate(price(), price(), now=NOW, event=EVENT) == []


def test_missing_envelope_attributes_are_null() -> None:
    """Envelope attributes the event lacks are null, so rules can test for them without erring."""
    spec = RuleSpec("optional", "event.version == null && event.time == null")
    assert run(spec, price(), event={"id": "e-2", "time": "not a time"}) == []


def test_off_rules_are_compiled_but_not_evaluated() -> None:
    """A rule turned off is still checked at start, and then costs nothing per event."""
    rules = compile_rules([RuleSpec("muted", "data.price > 1000", Severity.OFF), PRICE_POSITIVE])
    assert rules.names == ("price_positive",)
    with pytest.raises(RuleCompileError):
        compile_rules([RuleSpec("muted", "data.price >", Severity.OFF)])


def test_uses_last_tells_whether_last_known_good_is_needed() -> None:
    """`uses_last` is true only when some rule reads `last` or `has_last`."""
    assert compile_rules([PRICE_POSITIVE, FRESH]).uses_last is False
    assert compile_rules([PRICE_POSITIVE, PRICE_CHANGE]).uses_last is True
    assert compile_rules([RuleSpec("first", "has_last || data.price < 100")]).uses_last is True
    assert compile_rules([]).uses_last is False


def test_uses_event_tells_whether_the_attributes_are_needed() -> None:
    """`uses_event` is true when some rule reads `event`, or quotes an `event.x` path (a macro's variable)."""
    assert compile_rules([PRICE_POSITIVE, FRESH, PRICE_CHANGE]).uses_event is False
    assert compile_rules([RuleSpec("src", "event.source == 'pricing'")]).uses_event is True
    assert compile_rules([RuleSpec("m", "data.items.all(event, event.qty > 0)")]).uses_event is True
    assert compile_rules([]).uses_event is False


def test_empty_ruleset_passes_everything() -> None:
    """No rules: every event passes, whatever its data."""
    rules = compile_rules([])
    assert len(rules) == 0 and isinstance(rules, RuleSet)
    assert rules.evaluate(object(), None, now=math.nan, event={}) == []


def test_message_defaults_to_the_expression() -> None:
    """Without a message, the violation detail quotes the expression itself."""
    [reason] = run(RuleSpec("bare", "data.price > 100"), price(5))
    assert reason.detail == "rule 'bare' failed: data.price > 100 (data.price=5)"


# --- properties -----------------------------------------------------------------------------------------

KEYS = st.sampled_from(["price", "currency", "lastUpdated", "items", "qty", "x", ""]) | st.text(max_size=4)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=20,
)
ANY_RULES = compile_rules([
    *SEED_RULES,
    PRICE_CHANGE_NO_ABS,
    RuleSpec("size", "size(data) > 0"),
    RuleSpec("same", "data == last"),
    RuleSpec("member", "'price' in data"),
    RuleSpec("items", "data.items.all(i, i.qty > 0)"),
    RuleSpec("exists", "data.exists(k, k == 'x')"),
    RuleSpec("index", "data[0] == data.x"),
    RuleSpec("arith", "(data.price + 1) / (data.price - 1) * 2 >= -data.price % 1"),
])


@settings(max_examples=200, deadline=None)
@given(data=JSON, last=JSON)
def test_evaluate_never_raises(data: Any, last: Any) -> None:
    """For arbitrary JSON-like data and last-known-good, evaluate returns reasons and never raises."""
    reasons = ANY_RULES.evaluate(data, last, now=NOW, event=EVENT)
    assert len(reasons) <= len(ANY_RULES)
    assert all(r.code in (Code.INVARIANT_VIOLATED, Code.INVARIANT_ERROR) for r in reasons)


def test_deeply_nested_data_is_an_invariant_error() -> None:
    """Data nested deeper than the interpreter can walk yields invariant.error, not a RecursionError."""
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    reasons = compile_rules([PRICE_POSITIVE]).evaluate({"price": 1, "deep": deep}, None, now=NOW, event={})
    assert codes(reasons) == [Code.INVARIANT_ERROR]


NUMBER = st.integers(min_value=-(2**53), max_value=2**53) | st.floats(allow_nan=False, allow_infinity=False)
ORDER = compile_rules([RuleSpec("lt", "data.a < data.b"), RuleSpec("lt_int", "data.a < 3"),
                       RuleSpec("eq_int", "data.a == 3")])


@settings(max_examples=200, deadline=None)
@given(a=NUMBER, b=NUMBER)
def test_numeric_comparison_matches_python(a: float, b: float) -> None:
    """Comparisons between JSON numbers and int literals agree with exact numeric comparison."""
    failed = {r.detail.split("'")[1] for r in ORDER.evaluate({"a": a, "b": b}, None, now=NOW, event={})}
    assert ("lt" in failed) == (not float(a) < float(b))
    assert ("lt_int" in failed) == (not float(a) < 3)
    assert ("eq_int" in failed) == (float(a) != 3)


def test_missing_field_error_names_the_rule_and_the_field() -> None:
    """A rule that reads a field of a missing or null value says which rule and which field."""
    rules = compile_rules([PRICE_POSITIVE, RuleSpec("jump", "last.price > 0"),
                           RuleSpec("nested", "data.item.qty > 0")])
    details = [r.detail for r in rules.evaluate({"item": None}, None, now=NOW, event=EVENT)]
    assert details == [
        "rule 'price_positive' could not be evaluated: missing field 'price' (cannot read data.price)",
        "rule 'jump' could not be evaluated: cannot read last.price: last is null, which has no fields",
        "rule 'nested' could not be evaluated: cannot read data.item.qty: data.item is null, which has no fields",
    ]
