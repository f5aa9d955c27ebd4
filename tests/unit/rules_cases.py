"""Shared cases of the rules' tests: the seed's rules, the differential corpus, JSON strategies, outcomes."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from celpy.celtypes import BoolType
from hypothesis import strategies as st

from byzguard.rules import VARIABLES, RuleSet, RuleSpec, compile_rules
from byzguard.rules.closures import _fast_env
from byzguard.rules.operators import _Bail, _CelError
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


def generated_outcomes(rules: RuleSet, data: Any, last: Any, now: float = NOW, from_orjson: bool = False) -> set[str]:
    """The rules the generated function decides true by itself (the others it hands to the closures)."""
    assert rules._generated is not None
    slow = set(rules._generated(data, last, now, from_orjson))
    return {name for index, name in enumerate(rules.names) if index not in slow}
