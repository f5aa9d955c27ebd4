"""The hot path's shortcuts (memos, identity hashes, checks skipped when they cannot add a reason) give exactly
what the work they spare would have given."""

from __future__ import annotations

import copy
import pickle
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from byzguard import clocks, isotime, routing, state
from byzguard.clocks import VectorClock
from byzguard.config import Policy, TypePolicy
from byzguard.engine import _check_time, _check_vclock, _check_version, _Reasons, verify
from byzguard.envelope import Envelope, decode
from byzguard.guard import Result, Routed
from byzguard.integrity import KeyRing
from byzguard.rules import RuleSpec, compile_rules
from byzguard.stamp import Stamper
from byzguard.state import EntityState
from byzguard.verdict import Code, Outcome, Severity

from .conftest import Harness

NODES = st.sampled_from(["a", "b", "c", "pricing"])
CLOCKS = st.dictionaries(NODES, st.integers(1, 5), max_size=3).map(VectorClock)


# -- enums hashed by identity ------------------------------------------------------------------------------

def test_verdict_members_are_found_as_before_and_plain_strings_are_not() -> None:
    """Every Code, Severity and Outcome member is found in a member-keyed dict (also after pickling and
    copying), and neither its value nor its name as a plain string is: lookups behave as with Enum's hash."""
    for enum in (Code, Severity, Outcome):
        table = {member: member.value for member in enum}
        for member in enum:
            for same in (member, pickle.loads(pickle.dumps(member)), copy.deepcopy(member), enum(member.value)):
                assert table[same] == member.value
            assert str(member.value) not in table and member.name not in table
            assert hash(member) == hash(member)


# -- memoized clocks and clock headers ---------------------------------------------------------------------

@given(st.lists(CLOCKS, min_size=1, max_size=12))
def test_memoized_entity_clock_reads_as_the_parser_does(clocks: list[VectorClock]) -> None:
    """state._clock (memoized by the record's bytes) returns a clock equal to a fresh parse of those bytes,
    whatever clocks were read before it."""
    for clock in clocks:
        raw = clock.to_header()
        read = state._clock(raw)
        assert read == state._parse_clock(raw) == clock
        assert read.to_header() == raw


def test_entity_clock_memo_is_bounded_and_keeps_no_failure() -> None:
    """The entity clock memo never grows past its bound, and neither bytes that do not parse nor a large
    clock's are kept."""
    for i in range(clocks.MEMO_MAX + 10):
        state._clock(f"n={i + 1}".encode())
    assert len(state._CLOCKS) <= clocks.MEMO_MAX
    with pytest.raises(ValueError):
        state._clock(b"n=x")
    assert b"n=x" not in state._CLOCKS
    large = ",".join(f"node-{i:04d}={i + 1}" for i in range(100)).encode()
    assert len(large) > clocks.MEMO_KEY_MAX
    assert state._clock(large) == state._parse_clock(large)
    assert large not in state._CLOCKS


@given(st.lists(st.dictionaries(NODES, st.integers(1, 10**6), max_size=4), min_size=1, max_size=8))
def test_clock_header_is_computed_once_per_clock_and_stays_right(entries: list[dict[str, int]]) -> None:
    """VectorClock.to_header, kept on the clock after its first call, is the sorted `node=counter` text of
    that clock, for clocks built one after the other (no header leaks from one clock to another)."""
    for d in entries:
        clock = VectorClock(d)
        expected = ",".join(f"{node}={d[node]}" for node in sorted(d)).encode()
        assert clock.to_header() == expected
        assert clock.to_header() == expected
        merged = clock.merge(VectorClock({"z": 1}))
        assert merged.to_header() == ",".join(f"{n}={c}" for n, c in sorted({**d, "z": 1}.items())).encode()


# -- one-entry memos ------------------------------------------------------------------------------------

@given(st.lists(st.text(max_size=40), min_size=1, max_size=10))
def test_id_hash_memo_gives_every_id_its_own_hash(ids: list[str]) -> None:
    """id_hash (which keeps the last id it hashed) is the first 8 bytes of xxh3-128 of each id, also for equal
    ids in other string objects and ids of the same length."""
    for event_id in ids + [event_id[::-1] for event_id in ids] + ["".join(list(event_id)) for event_id in ids]:
        assert state.id_hash(event_id) == xxhash.xxh3_128_digest(event_id.encode("utf-8", "surrogatepass"))[:8]


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0]), min_size=1,
                max_size=10))
def test_verified_at_memo_writes_each_now_as_formatted(nows: list[float]) -> None:
    """The verified-at header (verified_headers keeps the last `now` formatted) is `now` written with six
    decimals, for every `now` in turn: 0.0 and -0.0, NaN and the same value twice included."""

    def verified_at(now: float) -> bytes:
        at = routing.verified_headers(None, Outcome.VERIFIED, (), "r", now)[-1]
        assert at[0] == routing.H_VERIFIED_AT
        return at[1]

    for now in nows + nows:
        assert verified_at(now) == f"{now:.6f}".encode()
    assert verified_at(0.0) == b"0.000000"
    assert verified_at(-0.0) == b"-0.000000"


@given(st.lists(st.tuples(st.sampled_from([Outcome.VERIFIED, Outcome.WARNED, Outcome.SUSPECT]),
                          st.sampled_from(["prices", "orders", "ünï", ""]) | st.text(max_size=8),
                          st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0])), min_size=1, max_size=12))
def test_verified_headers_shared_pairs_write_what_they_spelled(calls: list[tuple[Outcome, str, float]]) -> None:
    """verified_headers hands every record the same verdict, route and verified-at pairs (built once, the route's
    per name): each list is what it spelled out before, call after call, routes and outcomes interleaved, also
    once the route memo was cleared at its bound."""
    headers = [("content-type", b"application/json"), ("byzguard_verdict", b"old"), ("byzguard_recheck_of", b"x")]
    routing._ROUTE_HEADER.clear()  # full: the first route not in it clears it (fillers longer than any route here)
    routing._ROUTE_HEADER.update({f"filler-route-{i}": (routing.H_ROUTE, b"")
                                  for i in range(routing._ROUTE_HEADERS_MAX)})
    for outcome, route, now in calls + calls:
        assert routing.verified_headers(headers, outcome, (), route, now) == [
            ("content-type", b"application/json"), ("byzguard_recheck_of", b"x"),
            (routing.H_VERDICT, routing._VERDICT_OF[outcome]), (routing.H_ROUTE, route.encode()),
            (routing.H_VERIFIED_AT, f"{now:.6f}".encode())]
    assert len(routing._ROUTE_HEADER) <= routing._ROUTE_HEADERS_MAX


# -- the event time decode parsed, reused by the freshness rule --------------------------------------------

FRESH = compile_rules([RuleSpec(name="fresh", expr="now - timestamp(data.lastUpdated) < duration('24h')")])
LIMIT = 86_400.0


def _structured(time_text: str) -> bytes:
    return orjson.dumps({"specversion": "1.0", "id": "e-1", "source": "s", "type": "t", "subject": "k",
                         "time": time_text, "data": {}})


def _fresh(last_updated: str, now: float) -> list[Any]:
    return FRESH.evaluate({"lastUpdated": last_updated}, None, now=now, event={}, from_orjson=True)


def _zulu(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


TIMES = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)).map(
    lambda d: _zulu(d.replace(tzinfo=UTC)))


@settings(max_examples=300)
@given(TIMES, st.integers(-3_000, 3_000), st.sampled_from([None, "fixed", "1 s later", "1 ms earlier"]))
def test_freshness_rule_reads_the_time_decode_parsed_as_it_would_parse_it(text: str, ms_from_limit: int,
                                                                         other: str | None) -> None:
    """The freshness rule decides the same whether decode just parsed the same time text (the rule then reuses
    it), another text (the same day's included), or none: around the 24-hour limit, to the millisecond."""
    moment = datetime.fromisoformat(text)
    now = moment.timestamp() + LIMIT + ms_from_limit / 1000
    isotime.LAST[0] = ("", datetime(1970, 1, 1, tzinfo=UTC), 0.0)
    reference = _fresh(text, now)
    assert bool(reference) is (ms_from_limit >= 0)
    if other is not None:
        primed = {"fixed": "2001-01-01T00:00:00.000Z", "1 s later": _zulu(moment + timedelta(seconds=1)),
                  "1 ms earlier": _zulu(moment - timedelta(milliseconds=1))}[other]
        decode(b"k", _structured(primed), [])
        assert _fresh(text, now) == reference
    env = decode(b"k", _structured(text), [])
    assert isinstance(env, Envelope)
    assert isotime.LAST[0][0] == text and isotime.LAST[0][2] == env.time
    assert _fresh(text, now) == reference


def test_decode_keeps_only_an_aware_time() -> None:
    """A time without an offset (read as UTC) is not kept for the rules: fromisoformat alone gives it no zone."""
    isotime.LAST[0] = ("", datetime(1970, 1, 1, tzinfo=UTC), 0.0)
    decode(b"k", _structured("2026-05-28T20:26:40"), [])
    assert isotime.LAST[0][0] == ""
    decode(b"k", _structured("2026-05-28T20:26:40+02:00"), [])
    assert isotime.LAST[0][1] == datetime(2026, 5, 28, 18, 26, 40, tzinfo=UTC)


# -- checks called only when they can add a reason ---------------------------------------------------------

def _policy(max_age: float | None, max_skew: float | None) -> TypePolicy:
    return TypePolicy(Policy.FAIL_CLOSED, {}, max_age, max_skew, None, None, False, compile_rules([]))


@settings(max_examples=300)
@given(st.integers(0, 6) | st.none(), st.integers(0, 6) | st.none(), CLOCKS | st.none(), CLOCKS | st.none(),
       st.floats(-200, 200) | st.none(), st.sampled_from([None, 60.0]), st.sampled_from([None, 30.0]))
def test_verify_reports_what_each_check_reports(version: int | None, last: int | None,
                                               clock: VectorClock | None, entity_clock: VectorClock | None,
                                               age: float | None, max_age: float | None,
                                               max_skew: float | None) -> None:
    """verify, which calls the version, clock and time checks only where they can add a reason, reports
    exactly the reasons those checks report when always called."""
    now = 1_800_000_000.0
    env = Envelope(id="e-2", source="s", type="t", subject="k", mode="structured", covered=b"{}",
                   time=None if age is None else now - age, version=version, vclock=clock)
    entity = EntityState(last, entity_clock, b"\x01" * 16, b"", "t", now - 10, None, b"")
    policy = _policy(max_age, max_skew)
    expected = _Reasons(policy)
    if version is not None and last is not None:
        _check_version(version, entity, env, expected)
    if clock is not None and entity_clock is not None:
        _check_vclock(env, entity, expected)
    _check_time(env, policy, now, now, expected)
    decision = verify(env, policy, entity, None, KeyRing(), now=now)
    assert [(r.code, r.detail) for r in decision.reasons] == [(r.code, r.detail) for r in expected.items]


def test_stale_time_is_still_reported_past_the_skipped_checks() -> None:
    """An event past max_age with the next version and a later clock is time.stale: skipping the version and
    clock checks leaves the time check in place."""
    now = 1_800_000_000.0
    env = Envelope(id="e-3", source="s", type="t", subject="k", mode="structured", covered=b"{}",
                   time=now - timedelta(hours=2).total_seconds(), version=3, vclock=VectorClock({"s": 3}))
    entity = EntityState(2, VectorClock({"s": 2}), b"\x01" * 16, b"", "t", now - 10, None, b"")
    decision = verify(env, _policy(3600.0, None), entity, None, KeyRing(), now=now)
    assert [r.code for r in decision.reasons] == [Code.TIME_STALE]


# -- records built field by field --------------------------------------------------------------------------

def test_process_fills_every_field_of_its_result_and_routed_records(harness: Harness) -> None:
    """Guard.process builds Result and Routed without their __init__: every field is set, the defaults as
    __init__ sets them (a field added later must be added there too)."""
    event = Stamper("pricing").structured({"price": 1.5, "currency": "USD"}, type="price.updated",
                                          subject="sku-1", version=1, time=1_800_000_000.0)
    result = harness.feed_all(event.key, event.value, event.headers, now=1_800_000_000.0)
    for name in (f.name for f in fields(Result)):
        assert hasattr(result, name), name
    assert (result.held_delta, result.oldest_held_age) == (Result().held_delta, Result().oldest_held_age)
    routed = result.first
    for name in (f.name for f in fields(Routed)):
        assert hasattr(routed, name), name
    assert routed.decision.outcome is Outcome.VERIFIED and routed.verified_headers is not None
    assert routed.quarantine_headers is None and routed.envelope is not None


def test_event_clock_memo_keeps_no_long_clock() -> None:
    """decode reads a vector clock text longer than the memo keeps as it reads a short one, and does not keep it."""
    from byzguard import envelope
    text = ",".join(f"node-{i:04d}={i + 1}" for i in range(50))
    assert len(text) > clocks.MEMO_KEY_MAX
    value = orjson.dumps({"specversion": "1.0", "id": "e-4", "source": "s", "type": "t", "subject": "k",
                          "vectorclock": text, "data": {}})
    env = decode(b"k", value, [])
    assert isinstance(env, Envelope) and env.vclock == VectorClock.from_header(text)
    assert text not in envelope._VCLOCKS
