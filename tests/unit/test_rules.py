"""Invariant rules in CEL: the seed article's price invariants, compile-time refusal, safe evaluation."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections import OrderedDict
from typing import Any

import pytest
from celpy.celtypes import BoolType, DoubleType, ListType, MapType, StringType, TimestampType
from celpy.evaluation import CELEvalError, Evaluator
from hypothesis import given, settings
from hypothesis import strategies as st
from lark import Tree

from byzguard.errors import ConfigError, RuleCompileError
from byzguard.rules import VARIABLES, RuleSet, RuleSpec, closures, compile_rules, conversion, environment, operators
from byzguard.rules.closures import _fast_env
from byzguard.rules.operators import _Bail, _CelError, _PlainStr
from byzguard.rules.ruleset import _celpy_only, _closures_only
from byzguard.verdict import Code, Reason, Severity

NOW = 1_750_000_000.0  # a fixed "now", so freshness rules don't depend on the wall clock
EVENT: dict[str, Any] = {"id": "e-1", "source": "pricing-service", "type": "price.updated",
                         "subject": "p-1", "time": NOW - 1.0, "version": 7}

# The seed article's Strategy 2 invariants, spelled as users write them.
PRICE_POSITIVE = RuleSpec("price_positive", "data.price > 0", Severity.REJECT, "Non-positive price")
CURRENCY_ISO = RuleSpec("currency_iso", 'data.currency.matches("^[A-Z]{3}$")', Severity.REJECT,
                        "Currency is not an ISO 4217 code")
PRICE_CHANGE = RuleSpec("price_change", "last == null || abs(data.price - last.price) / last.price < 0.5",
                        Severity.WARN, "Suspicious price change")
PRICE_CHANGE_NO_ABS = RuleSpec(
    "price_change_no_abs",
    "last == null || (data.price - last.price) / last.price < 0.5"
    " && (last.price - data.price) / last.price < 0.5",
    Severity.WARN,
)
FRESH = RuleSpec("fresh", 'now - timestamp(data.lastUpdated) < duration("24h")', Severity.REJECT,
                 "Stale price data")
SEED_RULES = (PRICE_POSITIVE, CURRENCY_ISO, PRICE_CHANGE, FRESH)


def iso(epoch: float) -> str:
    """RFC 3339 text for an epoch time, as the seed's producers write lastUpdated."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")


def price(value: Any = 49.99, currency: str = "USD", age_s: float = 3600.0) -> dict[str, Any]:
    """A price event's data, valid unless told otherwise."""
    return {"productId": "p-1", "price": value, "currency": currency, "lastUpdated": iso(NOW - age_s)}


def run(spec: RuleSpec, data: Any, last: Any = None, event: dict[str, Any] | None = None) -> list[Reason]:
    """Evaluate one rule against one event."""
    return compile_rules([spec]).evaluate(data, last, now=NOW, event=EVENT if event is None else event)


def codes(reasons: list[Reason]) -> list[Code]:
    """The codes of some reasons, in order."""
    return [reason.code for reason in reasons]


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


# --- the fast path: compiled closures agree with celpy ---------------------------------------------------

# Each construct of the fast subset, error cases among them; every rule here must compile to closures.
CORPUS = (
    *SEED_RULES,
    PRICE_CHANGE_NO_ABS,
    RuleSpec("has_guard", "has(data.price) && data.price >= 0.01"),
    RuleSpec("optional_field", "!has(data.discount) || data.discount < data.price"),
    RuleSpec("int_parity", "int(data.qty) % 2 == 1"),
    RuleSpec("double_modulus", "data.qty % 2 == 0"),
    RuleSpec("negation", "-data.price < 0 && !(data.active == true)"),
    RuleSpec("currency_list", "data.currency in ['USD', 'EUR', 'GBP']"),
    RuleSpec("mixed_list", "data.qty in [1, 2, 3.5, 'x', null, [1], {'a': 1}]"),
    RuleSpec("key_in_data", "'price' in data && !('x' in data.items)"),
    RuleSpec("sizes", "size(data.tags) <= 3 && data.tags.size() >= 0"),
    RuleSpec("index", "data.tags[0] == 'a' || data.tags[1] != 'b' || data.tags[-1] == data.x"),
    RuleSpec("string_index", "data['price'] * 2 > last['price']"),
    RuleSpec("string_tests", "data.name.startsWith('p') && data.name.endsWith('1') || data.name.contains('-')"),
    RuleSpec("computed_string", "(data.name + '-').contains('-') || startsWith(data.name + 'x', data.x)"),
    RuleSpec("matches_function", "matches(data.name, '^[a-z]+-[0-9]+$') || data.x.matches('[')"),
    RuleSpec("dynamic_pattern", "data.name.matches(data.pattern)"),
    RuleSpec("ternary", "data.price > 10 ? data.currency == 'USD' : data.currency != 'USD'"),
    RuleSpec("ternary_non_bool", "data.x ? true : data.y"),
    RuleSpec("ternary_ints", "(data.flag ? 1 : 2.5) / (data.flag ? 2 : 0.5) > 0.1 || (data.flag ? 1 : 2) * data.a > 0"),
    RuleSpec("conversions", "string(data.qty) == '3.0' || double(data.name) > 1.0 || int(data.price) > 3"),
    RuleSpec("timestamps", "timestamp(data.lastUpdated) < now"
                           " && now - duration('1h') > timestamp(data.lastUpdated) - duration('30m')"),
    RuleSpec("duration_of", "duration(data.x) < duration('1h') || timestamp(data.x) + duration(data.y) > now"),
    RuleSpec("nested", "data.items[0].qty + data.items[1].qty == 3.0 && data.nested.deep.field == 1"),
    RuleSpec("map_literal", "{'USD': 1, 'EUR': 2}[data.currency] > 0"),
    RuleSpec("list_literal", "[data.price, last.price] == [last.price, data.price]"),
    RuleSpec("same", "data == last || data != last && size(data) > size(last)"),
    RuleSpec("arithmetic", "data.a / data.b > 1 || data.a - data.b < 1 || data.a + data.b * 2 <= 100"),
    RuleSpec("int_arithmetic", "size(data.tags) / (size(data.tags) - 1) + size(data.name) % 3 >= -1"),
    RuleSpec("uint", "data.qty > 1u || 3u - 2u == 1u && data.x < 2u"),
    RuleSpec("abs", "abs(data.price) == math.abs(-data.price) && abs(size(data.tags)) >= 0"),
    RuleSpec("last_known", "has_last && last.price != data.price || !has_last"),
    RuleSpec("logic_with_values", "data.flag || data.x > 0"),
    RuleSpec("non_bool_and", "data.flag && true"),
    RuleSpec("ordering", "data.x < data.y || data.x >= 'm' || data.y <= null"),
    RuleSpec("null_checks", "data.missing == null || data.price != null"),
    RuleSpec("division_by_zero", "data.price / 0 > 1 || 1 / (size(data.tags) - size(data.tags)) == 0"),
    RuleSpec("crash_hidden_by_or", "true || int(data.x) > 0"),
    RuleSpec("crash_hidden_by_and", "data.flag == false && int(data.price) > 0"),
    RuleSpec("crash_in_ternary", "data.missing ? int(data.price) > 0 : true"),
    RuleSpec("event", "event.version == 7 && event.source.startsWith('pricing') || event.time < now"),
    RuleSpec("dyn_and_has", "dyn(data.x) == data.x && has(data.items[0].qty) == has(data.items)"),
    RuleSpec("constant_error", "1 / 0 == 1 || data.price > 0"),
    RuleSpec("result_not_bool", "data.price"),
)
FAST_CORPUS = compile_rules(CORPUS)
CELPY_CORPUS = _celpy_only(FAST_CORPUS)

KEY_NAMES = ["price", "currency", "lastUpdated", "qty", "tags", "items", "name", "pattern", "x", "y", "a", "b",
             "flag", "active", "discount", "nested", "deep", "field"]
TIMESTAMP_TEXTS = st.sampled_from([
    "2025-06-15T14:13:20Z", "2025-06-15T14:13:20.5+05:30", "2025-06-15T14:13:20.123456789-00:00",
    "2025-02-30T00:00:00Z", "2025-06-15T24:00:00Z", "2025-06-15 14:13:20Z", "2025-06-15", "yesterday",
    "2025-06-15T14:13:20+24:00", "P1D", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59",
]) | st.datetimes(timezones=st.just(dt.UTC)).map(lambda moment: moment.isoformat().replace("+00:00", "Z"))
TEXTS = TIMESTAMP_TEXTS | st.sampled_from([
    "USD", "usd", "EUR", "", "p-1", "abc", "m", "3.0", "1e3", " 12 ", "0x1F", "-0x1F", "1_000", "24h",
    "-1.5h", "90m", "^[a-z]+-[0-9]+$", "[", "(a|b)+", "\ud800", "é", "a\nb",
]) | st.text(max_size=6)
NUMBERS = st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.sampled_from(
    [0, -1, 1, 2, 3, 0.0, -0.0, 0.5, 49.99, 2**53 + 1, 2**63, -(2**63), 10**400])
SCALARS = st.none() | st.booleans() | NUMBERS | TEXTS
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(KEY_NAMES) | st.text(max_size=3), children, max_size=3),
    max_leaves=8,
)
OBJECTS = st.fixed_dictionaries({}, optional=dict.fromkeys(KEY_NAMES, VALUES))
DATA = OBJECTS | OBJECTS | VALUES


def fast_outcomes(rules: RuleSet, data: Any, last: Any) -> dict[str, str]:
    """What each rule's closures decide on their own: pass, violated, error, or bail (celpy decides)."""
    env = _fast_env(frozenset(VARIABLES), data, last, NOW, EVENT, {})
    outcomes = {}
    for rule in rules._rules:
        assert rule.fast is not None
        try:
            value = rule.fast(env)
        except _CelError:
            outcomes[rule.name] = "error"
        except (_Bail, OverflowError):  # OverflowError: int() of an infinity, which crashes celpy too
            outcomes[rule.name] = "bail"
        else:
            is_bool = isinstance(value, bool | BoolType)
            outcomes[rule.name] = ("pass" if value else "violated") if is_bool else "error"
    return outcomes


def outcomes_of(reasons: list[Reason], names: tuple[str, ...]) -> dict[str, str]:
    """Each rule's outcome from evaluate()'s reasons: pass, violated or error."""
    failed = {reason.detail.split("'")[1]: reason.code for reason in reasons}
    return {name: {None: "pass", Code.INVARIANT_VIOLATED: "violated", Code.INVARIANT_ERROR: "error"}[
        failed.get(name)] for name in names}


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


CLOSURE_CORPUS = _closures_only(FAST_CORPUS)
PRICES = st.fixed_dictionaries({}, optional={
    "price": NUMBERS | st.floats(min_value=0.01, max_value=1e4) | TEXTS | st.none(),
    "currency": st.sampled_from(["USD", "EUR", "usd", "US", "USDX", "USD\n", ""]) | TEXTS | NUMBERS,
    "lastUpdated": TIMESTAMP_TEXTS | st.sampled_from([iso(NOW - 60), iso(NOW - 86_400), iso(NOW + 60)]) | NUMBERS,
    "qty": NUMBERS, "name": TEXTS, "x": SCALARS, "y": SCALARS, "a": NUMBERS, "b": NUMBERS, "flag": SCALARS,
    "active": SCALARS, "discount": NUMBERS, "tags": VALUES, "items": VALUES,
})


def worded(reasons: list[Reason]) -> list[tuple[Code, str, Severity]]:
    """Reasons as (code, detail, severity), without the object addresses some library errors quote."""
    return [(r.code, re.sub(r" at 0x[0-9a-f]+", "", r.detail), r.severity) for r in reasons]


def generated_outcomes(rules: RuleSet, data: Any, last: Any) -> set[str]:
    """The rules the generated function decides true by itself (the others it hands to the closures)."""
    assert rules._generated is not None
    slow = set(rules._generated(data, last, NOW))
    return {name for index, name in enumerate(rules.names) if index not in slow}


def test_generated_function_covers_the_seed_rules_and_most_of_the_subset() -> None:
    """The seed's rules and the shipped price rules are all in the generated function."""
    assert compile_rules(SEED_RULES).generated == tuple(spec.name for spec in SEED_RULES)
    assert compile_rules([PRICE_CHANGE_NO_ABS]).generated == ("price_change_no_abs",)
    assert {"has_guard", "optional_field", "negation", "string_tests", "ternary", "arithmetic",
            "last_known", "null_checks"} <= set(FAST_CORPUS.generated)
    assert "event" not in FAST_CORPUS.generated  # rules reading `event` stay with the closures
    assert _closures_only(FAST_CORPUS).generated == () == CELPY_CORPUS.generated


@settings(max_examples=300, deadline=None)
@given(data=DATA | PRICES, last=st.none() | PRICES | DATA)
def test_generated_path_agrees_with_closures_and_celpy(data: Any, last: Any) -> None:
    """On random JSON, the generated function, the closures and celpy give every rule the same outcome,
    errors included, and the same reasons word for word where the generated function hands over."""
    names = FAST_CORPUS.names
    generated = FAST_CORPUS.evaluate(data, last, now=NOW, event=EVENT)
    assert worded(generated) == worded(CLOSURE_CORPUS.evaluate(data, last, now=NOW, event=EVENT))
    reference = outcomes_of(CELPY_CORPUS.evaluate(data, last, now=NOW, event=EVENT), names)
    assert outcomes_of(generated, names) == reference
    # What the generated code decides on its own (rules true) celpy decides alike.
    assert all(reference[name] == "pass" for name in generated_outcomes(FAST_CORPUS, data, last))


@settings(max_examples=200, deadline=None)
@given(data=PRICES, last=st.none() | PRICES)
def test_generated_seed_rules_agree_with_celpy_on_price_events(data: Any, last: Any) -> None:
    """On price-shaped events (the generated code's expected case, and near misses), the seed rules have
    the outcomes celpy gives them."""
    rules = compile_rules((*SEED_RULES, PRICE_CHANGE_NO_ABS))
    reference = outcomes_of(_celpy_only(rules).evaluate(data, last, now=NOW, event=EVENT), rules.names)
    assert outcomes_of(rules.evaluate(data, last, now=NOW, event=EVENT), rules.names) == reference
    assert all(reference[name] == "pass" for name in generated_outcomes(rules, data, last))


def test_generated_source_holds_no_value() -> None:
    """The generated source is built from fixed templates: the rules' constants (strings, numbers,
    patterns, field names) are bound as names, and no event value ever becomes source text."""
    rules = compile_rules([RuleSpec("quote", "data.name == 'x\\' + __import__(\"os\")' && data.n < 1e9"),
                           CURRENCY_ISO, FRESH])
    assert rules.generated == ("quote", "currency_iso", "fresh")
    source = rules._generated.__doc__
    assert source is not None and "'" not in source and '"' not in source and "import" not in source
    assert "1e9" not in source and "1000000000" not in source and "lastUpdated" not in source
    hostile = {"name": "') or __import__('os').system('false') or ('", "n": 0, "currency": "USD",
               "lastUpdated": iso(NOW)}
    assert codes(rules.evaluate(hostile, None, now=NOW, event=EVENT)) == [
        Code.INVARIANT_VIOLATED]
    assert rules._generated.__doc__ == source


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


# Values of every kind the fast path handles, as expressions reading `data` (so the operators run per
# evaluation rather than being folded by celpy at compile time), plus a few constants.
KIND_DATA: dict[str, Any] = {"n": None, "t": True, "f": False, "d": 2.5, "z": 0.0, "inf": math.inf,
                             "l": [1, 2], "e": [], "s": "ab", "es": "", "m": {"a": 1},
                             "ts": "2025-06-15T14:13:20+05:30"}
KIND_EXPRS = {
    "null": "data.n", "true": "data.t", "false": "data.f", "double": "data.d", "zero": "data.z",
    "infinity": "data.inf", "int": "size(data.l)", "int zero": "size(data.e)", "negative int": "-size(data.l)",
    "int literal": "2", "uint": "2u", "uint zero": "0u", "double zero literal": "0.0", "string": "data.s",
    "empty string": "data.es", "computed string": "data.s + 'x'", "bytes": "b'ab'", "list": "data.l",
    "list literal": "[data.d]", "map": "data.m", "map literal": "{'a': 1, 2: 'b'}", "timestamp": "now",
    "parsed timestamp": "timestamp(data.ts)", "duration": "duration('1h')", "zero duration": "now - now",
    "error": "data.missing", "crash": "int(data.inf)",
}
BINARY_OPERATORS = ["+", "-", "*", "/", "%", "<", "<=", ">", ">=", "==", "!=", "in", "&&", "||"]
# Templates over placeholders A and B, into which each kind's parsed expression is grafted.
TEMPLATES = (
    ["-A", "!A", "size(A)", "A.size()", "abs(A)", "int(A)", "double(A)", "string(A)", "timestamp(A)",
     "duration(A)", "A.a", "has(A.a)", "A ? 1 : 2", "dyn(A)", "[A]"],
    [*(f"A {op} B" for op in BINARY_OPERATORS),
     "A[B]", "A.startsWith(B)", "endsWith(A, B)", "A.contains(B)", "A.matches(B)", "true ? A : B"],
)
# The celpy type each of the fast path's own representations stands for.
CELPY_TYPES = {float: DoubleType, str: StringType, bool: BoolType, dict: MapType, list: ListType, _PlainStr: str}


def primary(expr: str) -> Tree[Any]:
    """The `primary` node of `(expr)`: a parenthesised operand, ready to graft into a template."""
    node = environment._env().compile(f"({expr})")
    while node.data != "primary":
        node = node.children[0]
    return node


def graft(node: Tree[Any], operands: dict[str, Tree[Any]]) -> Tree[Any]:
    """A copy of a template's tree with each placeholder's primary node replaced by its operand's."""
    if node.data == "primary" and isinstance(node.children[0], Tree) and node.children[0].data == "ident":
        name = environment._first_token(node.children[0])
        if name in operands:
            return operands[name]
    return Tree(node.data, [graft(child, operands) if isinstance(child, Tree) else child
                            for child in node.children], node.meta)


# Variants that add nothing to a pair of kinds (a second double, a second string) are left out of pairs,
# to keep the matrix to a few thousand cases; errors and crashes pair with every kind in the logic.
PAIR_KINDS = ["null", "true", "double", "zero", "int", "int zero", "uint", "string", "computed string", "bytes",
              "list", "map literal", "timestamp", "duration", "error"]
LOGIC_TEMPLATES = ("A && B", "A || B", "true ? A : B", "A == B")


def kind_matrix() -> list[tuple[str, Tree[Any]]]:
    """Every operator and function of the subset over every kind (or pair of kinds), parsed."""
    operands = {name: primary(expr) for name, expr in KIND_EXPRS.items()}
    unary, binary = ([(t, environment._env().compile(t)) for t in group] for group in TEMPLATES)

    def case(text: str, tree: Tree[Any], a: str, b: str | None = None) -> tuple[str, Tree[Any]]:
        label = text.replace("A", f"<{a}>").replace("B", f"<{b}>")
        return label, graft(tree, {"A": operands[a]} if b is None else {"A": operands[a], "B": operands[b]})

    cases = [case(text, tree, a) for a in operands for text, tree in unary]
    cases += [case(text, tree, a, b) for a in PAIR_KINDS for b in PAIR_KINDS for text, tree in binary]
    cases += [case(text, tree, a, b) for a in operands for b in ("error", "crash") for text, tree in binary
              if text in LOGIC_TEMPLATES for a, b in ((a, b), (b, a))]
    return cases


def celpy_result(ast: Tree[Any]) -> tuple[str, Any]:
    """What celpy makes of an expression over KIND_DATA: ("value", v), ("error", None) or ("crash", None)."""
    activation = conversion._activation(frozenset(VARIABLES), KIND_DATA, None, NOW, EVENT)
    try:
        return "value", Evaluator(ast, activation).evaluate()
    except CELEvalError:
        return "error", None
    except Exception:
        return "crash", None


def fast_result(ast: Tree[Any]) -> tuple[str, Any]:
    """What the closures make of it: ("value", v), ("error", None) or ("bail", None)."""
    fast = closures._compile_fast(ast)
    if fast is None:
        # Only a constant celpy folds into something outside the fast path's values (`-duration('1h')`
        # is a bare timedelta in celpy) leaves a rule to celpy.
        assert id(ast) not in closures._mentions_variables(ast)
        return "bail", None
    env = _fast_env(frozenset(VARIABLES), KIND_DATA, None, NOW, EVENT, {})
    try:
        return "value", fast(env)
    except _CelError:
        return "error", None
    except (_Bail, OverflowError):
        return "bail", None


def same_value(fast: Any, reference: Any) -> bool:
    """The fast path's value stands for celpy's: the corresponding type and an equal value."""
    if type(reference) is not CELPY_TYPES.get(type(fast), type(fast)):
        return False
    if isinstance(reference, float) and math.isnan(reference):
        return math.isnan(fast)
    if isinstance(reference, dt.datetime) and reference.utcoffset() != fast.utcoffset():
        return False
    return environment._equal(operators._deep(fast), reference)


def test_kind_matrix_agrees_with_celpy() -> None:
    """Every operator and function over every pair of kinds: the closures' value, error or hand-over to
    celpy matches what celpy computes, type for type, including celpy's quirks and crashes."""
    decided = 0
    mismatches = []
    cases = kind_matrix()
    for text, ast in cases:
        reference, fast = celpy_result(ast), fast_result(ast)
        if fast[0] == "bail":
            continue
        decided += 1
        agree = fast[0] == reference[0] and (fast[0] != "value" or same_value(fast[1], reference[1]))
        if not agree:
            mismatches.append(f"{text}: fast {fast!r}, celpy {reference!r}")
    assert mismatches == []
    assert decided > 0.8 * len(cases)  # hand-overs to celpy are for celpy's quirks only


@settings(max_examples=300, deadline=None)
@given(moment=st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)),
       offset=st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1), digits=st.integers(0, 9),
       zulu=st.booleans())
def test_timestamp_parsing_matches_pendulum(moment: dt.datetime, offset: int, digits: int, zulu: bool) -> None:
    """RFC 3339 text the fast path parses itself gives the same instant, offset and text as celpy's."""
    fraction = f"{moment.microsecond:06d}{moment.microsecond % 1000:03d}"[:digits]
    zone = "Z" if zulu else f"{'-' if offset < 0 else '+'}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    text = moment.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0") + (f".{fraction}" if fraction else "") + zone
    try:
        expected = TimestampType(text)
    except ValueError:
        with pytest.raises(_CelError):
            operators._timestamp_of(text)
        return
    parsed = operators._timestamp_of(text)
    assert type(parsed) is TimestampType
    assert parsed == expected and parsed.utcoffset() == expected.utcoffset()
    assert str(parsed) == str(expected)


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
