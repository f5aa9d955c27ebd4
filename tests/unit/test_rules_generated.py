"""The generated function (byzguard.rules.generated): it holds rules true only where the closures and celpy do."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from byzguard.rules import RuleSpec, compile_rules
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
