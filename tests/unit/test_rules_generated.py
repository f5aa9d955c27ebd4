"""The generated function (byzguard.rules.generated): it holds rules true only where the closures and celpy do."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import orjson
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from byzguard.rules import RuleSpec, compile_rules, operators
from byzguard.rules.operators import _RFC3339
from byzguard.rules.ruleset import _celpy_only, _closures_only
from byzguard.verdict import Code
from tests.unit.rules_cases import (
    CELPY_CORPUS,
    CLOSURE_CORPUS,
    CURRENCY_ISO,
    DATA,
    EVENT,
    FAST_CORPUS,
    FRESH,
    NOW,
    PRICE_CHANGE_NO_ABS,
    PRICES,
    SEED_RULES,
    codes,
    generated_outcomes,
    iso,
    outcomes_of,
    worded,
)


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


def orjson_parsed(value: Any) -> Any:
    """The value as orjson parses its JSON (the engine's data and last-known-good); skipped if orjson can't."""
    try:
        return orjson.loads(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError):  # integers beyond 64 bits
        assume(False)
        raise


def nested(depth: int, leaf: Any) -> Any:
    """`leaf` inside `depth` alternating lists and objects."""
    for level in range(depth):
        leaf = [leaf] if level % 2 else {"deep": leaf}
    return leaf


DEEP = st.integers(min_value=30, max_value=1020).map(lambda depth: nested(depth, 1.5))


@settings(max_examples=150, deadline=None)
@given(data=DATA | PRICES, last=st.none() | PRICES | DATA, deep=st.none() | DEEP)
def test_generated_path_agrees_on_values_orjson_parsed(data: Any, last: Any, deep: Any) -> None:
    """Told the values are orjson's (as the engine says), the generated function skips checking them and still
    gives every rule the outcome celpy gives it, with the closures' very words, even where the data nests
    far deeper than the fast paths read as parsed."""
    if deep is not None and isinstance(data, dict):
        data = {**data, "nested": deep}
    data, last = orjson_parsed(data), orjson_parsed(last)
    names = FAST_CORPUS.names
    generated = FAST_CORPUS.evaluate(data, last, now=NOW, event=EVENT, from_orjson=True)
    assert worded(generated) == worded(CLOSURE_CORPUS.evaluate(data, last, now=NOW, event=EVENT))
    reference = outcomes_of(CELPY_CORPUS.evaluate(data, last, now=NOW, event=EVENT), names)
    assert outcomes_of(generated, names) == reference
    assert all(reference[name] == "pass" for name in generated_outcomes(FAST_CORPUS, data, last, from_orjson=True))


SINCE_RULES = compile_rules([
    FRESH, RuleSpec("le", "now - timestamp(data.t) <= duration('24h')"),
    RuleSpec("mirrored", "duration('24h') > now - timestamp(data.t)"),
    RuleSpec("ge", "now - timestamp(data.t) >= duration('1h30m')"),
    RuleSpec("gt", "duration('1h30m') <= now - timestamp(data.t)"),
    RuleSpec("negative", "now - timestamp(data.t) > duration('-2h')"),
])
SINCE_CELPY = _celpy_only(SINCE_RULES)
# Offsets from the limit, in seconds: at it, a microsecond either side, around the float path's margin.
NEAR = st.sampled_from([0.0, 1e-6, -1e-6, 5e-7, -5e-7, 1.5e-6, 9.99e-4, 1e-3, -1e-3, 1.001e-3, 0.5, -0.5]) | \
    st.floats(min_value=-0.01, max_value=0.01)


@settings(max_examples=200, deadline=None)
@given(moment=st.datetimes(min_value=dt.datetime(1, 1, 3), max_value=dt.datetime(9999, 12, 29),
                           timezones=st.just(dt.UTC)),
       shape=st.sampled_from(["ms", "s", "us", "offset"]), limit=st.sampled_from([86_400.0, 5_400.0, -7_200.0]),
       near=NEAR, odd_now=st.sampled_from([None, math.nan, math.inf, -math.inf, 1e300, -7e10, 2.6e11]))
def test_since_now_is_decided_as_the_datetimes_decide(moment: dt.datetime, shape: str, limit: float, near: float,
                                                      odd_now: float | None) -> None:
    """`now - timestamp(x)` against a duration, decided in seconds where it is far from the limit, gives the
    outcome celpy gives with datetimes, at the limit, a microsecond off it, and for a `now` out of range."""
    text = {"ms": moment.isoformat(timespec="milliseconds"), "s": moment.isoformat(timespec="seconds"),
            "us": moment.isoformat(timespec="microseconds"),
            "offset": moment.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30))).isoformat()}[shape]
    text = text.replace("+00:00", "Z")
    now = moment.timestamp() + limit + near if odd_now is None else odd_now
    data = {"t": text}
    names = SINCE_RULES.names
    reference = outcomes_of(SINCE_CELPY.evaluate(data, None, now=now, event=EVENT), names)
    generated = SINCE_RULES.evaluate(data, None, now=now, event=EVENT, from_orjson=True)
    assert outcomes_of(generated, names) == reference
    assert worded(generated) == worded(_closures_only(SINCE_RULES).evaluate(data, None, now=now, event=EVENT))
    assert all(reference[name] == "pass" for name in generated_outcomes(SINCE_RULES, data, None, now, True))


# Characters that may stand where JavaScript writes digits and separators, non-ASCII digits among them.
ISO_CHARACTERS = st.sampled_from([*"0123456789", "-", ":", ".", "T", "t", "Z", "z", " ", "+", "W", "\u0663",
                                  "\uff11"])


@settings(max_examples=1000, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 23), ISO_CHARACTERS), max_size=3))
def test_javascript_shape_is_rfc3339_where_fromisoformat_reads_it(edits: list[tuple[int, str]]) -> None:
    """The generated code's shortcut (24 characters, JavaScript's separators, then fromisoformat) accepts only
    text the RFC 3339 pattern accepts, so it parses exactly what _timestamp_of would."""
    chars = list("2025-06-15T14:13:20.123Z")
    for at, char in edits:
        chars[at] = char
    text = "".join(chars)
    if not (text[23:] == "Z" and text[4:20:3] == "--T::."):
        return
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return
    assert _RFC3339.fullmatch(text) is not None
    assert parsed == operators._timestamp_of(text)
