"""A route's event types are an allow-list: a type it does not list is refused (type.unlisted) unless the route
opts in to passing it with a warning (`unlisted_types: warn`)."""

from __future__ import annotations

import pytest

from byzguard import config as guard_config
from byzguard.errors import ConfigError
from byzguard.stamp import Stamper
from byzguard.verdict import Code, Outcome, Severity

from .conftest import BASE_CONFIG, Harness

NOW = 1_800_000_000.0
OPEN_ROUTE = """
routes:
  - name: main
    inputs: [in]
    verified_topic: out
    quarantine_topic: bad
    unlisted_types: warn
"""


def test_unlisted_type_is_refused_with_its_own_code(harness: Harness) -> None:
    """`price.updatedd` from an unknown source with a plain sha256 is quarantined as type.unlisted, and it
    writes no state."""
    event = Stamper("nobody").binary({"price": 1.0}, type="price.updatedd", subject="sku-1", version=1, time=NOW)
    routed = harness.feed(event.key, event.value, event.headers, now=NOW)
    assert routed.decision.outcome is Outcome.QUARANTINED
    assert [(r.code, r.check, r.severity) for r in routed.decision.reasons] == [
        (Code.TYPE_UNLISTED, "authorization", Severity.REJECT)]
    assert "'price.updatedd'" in routed.decision.reasons[0].detail
    assert not harness.entities


def test_listed_type_passes(harness: Harness) -> None:
    """The same event under the listed type and an allowed source is verified."""
    event = Stamper("pricing").binary({"price": 1.0}, type="price.updated", subject="sku-1", version=1, time=NOW)
    assert harness.feed(event.key, event.value, event.headers, now=NOW).decision.outcome is Outcome.VERIFIED


def test_route_that_opts_in_passes_unlisted_types_with_a_warning() -> None:
    """With `unlisted_types: warn` an unlisted type is forwarded, and its record says why."""
    h = Harness(OPEN_ROUTE)
    event = Stamper("anyone").binary({"n": 1}, type="thing.happened", subject="t-1", version=1, time=NOW)
    routed = h.feed(event.key, event.value, event.headers, now=NOW)
    assert routed.decision.outcome is Outcome.WARNED
    assert [(r.code, r.severity) for r in routed.decision.reasons] == [(Code.TYPE_UNLISTED, Severity.WARN)]


def test_turning_authorization_down_does_not_open_the_allow_list() -> None:
    """`checks: {authorization: off}` (or warn) silences source checks, never the allow-list: only the route's
    own `unlisted_types` does."""
    for level in ("off", "warn"):
        h = Harness(BASE_CONFIG.replace("  max_age: 24h", f"  max_age: 24h\n  checks: {{authorization: {level}}}"))
        event = Stamper("pricing").binary({"price": 1.0}, type="other.type", subject="sku-1", version=1, time=NOW)
        routed = h.feed(event.key, event.value, event.headers, now=NOW)
        assert routed.decision.outcome is Outcome.QUARANTINED, level
        assert [r.code for r in routed.decision.reasons] == [Code.TYPE_UNLISTED]


def test_type_unlisted_cannot_be_loosened_through_codes() -> None:
    """`codes: {type.unlisted: warn}` is refused: the route's `unlisted_types` is the one switch."""
    with pytest.raises(ConfigError, match=r"unknown code\(s\) \['type.unlisted'\]"):
        guard_config.loads(BASE_CONFIG.replace("  max_age: 24h", "  max_age: 24h\n  codes: {type.unlisted: warn}"),
                           environ={"KEY_PRICING": "x", "KEY_ORDERS": "y"})


def test_route_without_types_is_refused_unless_it_opts_in() -> None:
    """A route that lists no types would refuse everything: the file is refused with its line and what to do;
    with `unlisted_types: warn` it loads."""
    text = OPEN_ROUTE.replace("    unlisted_types: warn\n", "")
    with pytest.raises(ConfigError) as err:
        guard_config.loads(text, source_path="r.yaml")
    assert "r.yaml:3: routes.0:" in str(err.value)
    assert "lists no types" in str(err.value) and "unlisted_types: warn" in str(err.value)
    route = guard_config.loads(OPEN_ROUTE).routes[0]
    assert route.policy_for("any.type").level(Code.TYPE_UNLISTED) is Severity.WARN


def test_default_type_must_be_listed() -> None:
    """A default_type the route does not list would refuse every record that relies on it: refused at load."""
    text = BASE_CONFIG.replace("default_type: price.updated", "default_type: price.update")
    with pytest.raises(ConfigError, match=r"default_type 'price\.update' is not listed under types"):
        guard_config.loads(text, environ={"KEY_PRICING": "x", "KEY_ORDERS": "y"})


def test_unlisted_types_takes_reject_or_warn_only() -> None:
    """`unlisted_types: off` (silently open) does not exist: a lenient form always leaves a warning."""
    with pytest.raises(ConfigError, match="unlisted_types"):
        guard_config.loads(OPEN_ROUTE.replace("unlisted_types: warn", "unlisted_types: 'off'"))


def test_shipped_configuration_keeps_its_routes_closed() -> None:
    """byzguard.yaml opts no route in: every route refuses unlisted types (that its demo traffic passes is
    test_dev_faults' documented-configuration test)."""
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    cfg = guard_config.load(repo / "byzguard.yaml", environ={"BYZGUARD_KEY_PRICING_1": "s"})
    assert all(not r.fallback.listed and r.fallback.level(Code.TYPE_UNLISTED) is Severity.REJECT
               for r in cfg.routes)
