"""verify's clean path decides every event exactly as the full run of the checks does, or leaves it to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import events as bench_events
from bench.core import _config
from byzguard.clocks import VectorClock, lamport_mark_key
from byzguard.config import GuardConfig
from byzguard.engine import Limits, _advance, verify, verify_checked, verify_clean
from byzguard.envelope import Envelope, decode
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, Guard, RecordIn
from byzguard.integrity import HMAC_SHA256, Key, KeyRing
from byzguard.rules import RuleSet
from byzguard.stamp import Stamper
from byzguard.state import encode_lamport
from byzguard.verdict import Code, Outcome, Severity

AT = 1_780_000_000.0
NOW = AT + 1.0
LIMITS = Limits(32, 86_400.0, 256 * 1024)
# Codes whose severity a drawn policy changes (off and warn take the clean path's fall-backs, too).
CODES = [Code.ID_DUPLICATE, Code.INVARIANT_VIOLATED, Code.VERSION_GAP, Code.VCLOCK_CONCURRENT, Code.TIME_STALE,
         Code.LAMPORT_REGRESSION, Code.INTEGRITY_BAD_MAC, Code.STATE_LAST_GOOD_TOO_LARGE, Code.SOURCE_NOT_ALLOWED]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> GuardConfig:
    return _config(Path(tmp_path_factory.mktemp("clean")))


def _envelope(version: int, price: float, *, event_id: str | None = None, tamper: bool = False,
              clock: bool = True) -> Envelope:
    data = bench_events.price_data(3, version, AT)
    data["price"] = price
    stamped = bench_events.stamper().structured(data, type=bench_events.EVENT_TYPE, subject="sku-3",
                                                version=version, time=AT,
                                                vclock=VectorClock({bench_events.SOURCE: version}) if clock
                                                else None,
                                                event_id=event_id)
    value = stamped.value.replace(b'"sku-3"', b'"sku-4"') if tamper else stamped.value
    env = decode(b"sku-3" if not tamper else b"sku-4", value, stamped.headers)
    assert isinstance(env, Envelope)
    return env


def _decide(keyring: KeyRing, env: Envelope, policy: Any, entity: Any, mark: int | None, now: float,
            limits: Limits, received: float | None, writer: str | None) -> None:
    full = verify_checked(env, policy, entity, mark, keyring, now, limits, received, writer)
    clean = verify_clean(env, policy, entity, mark, keyring, now, limits, received, writer)
    assert verify(env, policy, entity, mark, keyring, now=now, limits=limits, received=received,
                  writer=writer) == full
    if clean is not None:  # decided there, or handed to the full checks with a failed integrity check or rule
        assert clean == full


def test_clean_path_takes_the_shipped_event_and_decides_it_as_every_check_does(config: GuardConfig) -> None:
    """The benchmark's clean event (next version, later clock, fresh) is decided by the clean path, and the
    decision equals the full checks' one, field by field."""
    policy = config.routes[0].policy_for(bench_events.EVENT_TYPE)
    first = _envelope(1, 10.0)
    entity = _advance(first, None, NOW - 5, LIMITS)
    env = _envelope(2, 10.5)
    clean = verify_clean(env, policy, entity, None, config.keyring, NOW, LIMITS, AT, None)
    assert clean is not None
    assert clean == verify_checked(env, policy, entity, None, config.keyring, NOW, LIMITS, AT, None)


# One clean setting (the first) per input, and the others that make a check object or change what it sees.
VARIANTS: dict[str, list[Any]] = {
    "history": [1, 0, 2, 3], "version": [2, 1, 3, 6], "price": [10.5, 30.0, -1.0], "same_id": [False, True],
    "tamper": [False, True], "clock": [True, False],
    "keyring": ["config", "none", "another source's"], "entity_version": ["keep", "none", "minus", "plus"],
    "entity_clock": ["keep", "none", "ahead", "other"], "mark": [None, -1, 0, 1],
    # (seconds after the event's time, the type's max_age): past max_age only, past the freshness rule too, ahead.
    "time": [(0.0, "keep"), (100.0, 60.0), (200_000.0, "keep"), (-500.0, "keep"), (0.0, None)],
    "received": [None, AT, NOW + 100],
    "writer": [None, bench_events.SOURCE, "other"],
    "max_skew": ["keep", None, 30.0], "sources": ["keep", None, frozenset({"other"})],
    "key_ids": ["keep", None, frozenset({"other"})], "listed": [True, False], "last_good_max": [256 * 1024, 10],
}


@st.composite
def _inputs(draw: st.DrawFn) -> dict[str, Any]:
    """Every input clean but a few (none, often), each of those drawn from its variants."""
    changed = draw(st.sets(st.sampled_from(sorted(VARIANTS)), max_size=3))
    return {name: draw(st.sampled_from(values[1:])) if name in changed else values[0]
            for name, values in VARIANTS.items()}


@settings(max_examples=400, deadline=None)
@given(inputs=_inputs(), levels=st.dictionaries(st.sampled_from(CODES), st.sampled_from(list(Severity)), max_size=2))
def test_clean_path_and_full_checks_decide_alike(config: GuardConfig, inputs: dict[str, Any],
                                                 levels: dict[Code, Severity]) -> None:
    """Over clean and faulty events, states, marks, times and policies: verify (clean path first) gives the
    very decision of the full checks, and so does the clean path wherever it decides."""
    base = config.routes[0].policy_for(bench_events.EVENT_TYPE)
    changes: dict[str, Any] = {"severity": {**base.severity, **levels}, "listed": inputs["listed"]}
    age, inputs["max_age"] = inputs["time"]
    for name in ("max_age", "max_skew", "sources", "key_ids"):
        if inputs[name] != "keep":
            changes[name] = inputs[name]
    policy = dataclasses.replace(base, **changes)
    limits = Limits(32, 86_400.0, inputs["last_good_max"])
    version = inputs["version"]
    entity = None
    last_id = None
    for v in range(max(1, version - inputs["history"]), version):
        previous = _envelope(v, 10.0)
        last_id = previous.id
        entity = _advance(previous, entity, NOW - 10, limits)
    env = _envelope(version, inputs["price"], event_id=last_id if inputs["same_id"] else None,
                    tamper=inputs["tamper"], clock=inputs["clock"])
    if entity is not None:
        entity = dataclasses.replace(entity, version={
            "keep": entity.version, "none": None, "minus": (entity.version or 1) - 1,
            "plus": (entity.version or 0) + 1}[inputs["entity_version"]], vclock={
            "keep": entity.vclock, "none": None, "ahead": VectorClock({bench_events.SOURCE: 99}),
            "other": VectorClock({"other": 1})}[inputs["entity_clock"]])
    mark = inputs["mark"]
    the_mark = None if mark is None or env.lamport is None else env.lamport + mark
    keyring = {"config": config.keyring, "none": KeyRing({}), "another source's": KeyRing({bench_events.KEY_ID: Key(
        bench_events.KEY_ID, "other", bench_events.SECRET.encode())})}[inputs["keyring"]]
    _decide(keyring, env, policy, entity, the_mark, AT + age, limits, inputs["received"], inputs["writer"])


@pytest.mark.parametrize("instance", [None, "i-1"])
def test_guard_keeps_the_lamport_mark_under_its_writers_key(config: GuardConfig, instance: str | None) -> None:
    """Guard.process writes a verified event's Lamport time as encode_lamport writes it, under the key
    lamport_mark_key gives its source (and producer instance), which it builds inline."""
    stamper = Stamper(bench_events.SOURCE, instance=instance, algorithm=HMAC_SHA256,
                      key=Key(bench_events.KEY_ID, bench_events.SOURCE, bench_events.SECRET.encode()))
    stamped = stamper.structured(bench_events.price_data(3, 1, AT), type=bench_events.EVENT_TYPE, subject="sku-3",
                                 version=1, time=AT, vclock=VectorClock({bench_events.SOURCE: 1}))
    env = decode(stamped.key, stamped.value, stamped.headers)
    assert isinstance(env, Envelope) and env.lamport is not None and env.instance == instance
    route = config.routes[0]
    result = Guard(config).process(RecordIn(stamped.key, stamped.value, stamped.headers, "in", 0, 0, AT), route,
                                   {ENTITIES: {}, LAMPORTS: {}, CAUSAL: {}}, now=NOW)
    assert result.first.decision.outcome is Outcome.VERIFIED
    assert result.writes[(LAMPORTS, lamport_mark_key(bench_events.SOURCE, instance))] == encode_lamport(env.lamport)


@pytest.mark.parametrize("price", [10.5, -1.0])
def test_rules_without_a_generated_function_are_evaluated_on_the_clean_path(config: GuardConfig,
                                                                           price: float) -> None:
    """Rules the generator did not translate are evaluated by their closures on the clean path: a clean event
    is decided there, a violating one handed to the full checks with the violations, both as the full checks
    decide them."""
    base = config.routes[0].policy_for(bench_events.EVENT_TYPE)
    policy = dataclasses.replace(base, rules=RuleSet(base.rules._rules, generate=False))
    assert policy.rules.plan is not None and policy.rules.plan[0] is None
    entity = _advance(_envelope(1, 10.0), None, NOW - 5, LIMITS)
    env = _envelope(2, price)
    clean = verify_clean(env, policy, entity, None, config.keyring, NOW, LIMITS, AT, None)
    assert clean is not None and (clean.outcome is Outcome.VERIFIED) == (price > 0)
    _decide(config.keyring, env, policy, entity, None, NOW, LIMITS, AT, None)
