"""The packed entity record: format, bounds, reading records of the earlier format, last-known-good rules."""

from __future__ import annotations

import struct

import orjson
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from app.entities import NOT_FOUND, describe_last_good
from byzguard.clocks import VectorClock
from byzguard.guard import ENTITIES
from byzguard.stamp import Stamper
from byzguard.state import (
    ENTRY_SIZE,
    FORMAT,
    MERGED_CLOCK_MAX_ENTRIES,
    EntityState,
    bounded_merge,
    id_hash,
    new_entries,
)
from byzguard.verdict import Outcome
from tests.unit.conftest import BASE_CONFIG, Harness

NOW = 1_800_000_000.0
PRICE = {"price": 49.99, "currency": "USD"}


def price(stamper: Stamper, version: int, value: float = 49.99, at: float = NOW,  # type: ignore[no-untyped-def]
          **kw: object):
    """A price event of sku-1 at `version`."""
    return stamper.structured({**PRICE, "price": value}, type="price.updated", subject="sku-1", version=version,
                              time=at, **kw)


def send(h: Harness, stamped, now: float = NOW):  # type: ignore[no-untyped-def]
    """Route one event; the routing of the event itself."""
    return h.feed(stamped.key, stamped.value, stamped.headers, now=now)


def record(h: Harness) -> bytes:
    """The only entity record of the harness."""
    (raw,) = h.state[ENTITIES].values()
    return raw


def legacy(state: EntityState, ids: list[tuple[str, float, int | None]]) -> bytes:
    """`state` written in the earlier orjson list format, with these (id, seen at, version) entries."""
    return orjson.dumps([
        1, state.version, state.vclock.to_header().decode() if state.vclock else None, state.content_hash.hex(),
        state.last_good.decode("latin-1"), state.last_good_type, state.verified_at, state.event_time,
        [[event_id, state.content_hash.hex(), seen_at, version] for event_id, seen_at, version in ids]])


def test_record_round_trips_with_its_format_version() -> None:
    """A record starts with its format version and reads back as written, binary last-known-good included."""
    state = EntityState(7, VectorClock({"a": 3, "b": 1}), b"\x01" * 16, b"\xff\x00raw", "thing.put", NOW, None,
                        b"", 0)
    raw = state.to_bytes()
    assert raw[0] == FORMAT == 3
    assert EntityState.from_bytes(raw) == state


def test_recent_ids_are_fixed_width_and_a_huge_id_costs_16_bytes() -> None:
    """Each remembered id costs one 16-byte entry whatever its length: a 100 KB id is kept as an 8-byte hash."""
    h = Harness()
    stamper = Stamper("pricing")
    send(h, price(stamper, 1))
    before = len(record(h))
    huge = "x" * 100_000
    routed = send(h, price(stamper, 2, event_id=huge))
    assert routed.decision.outcome is Outcome.VERIFIED
    assert len(record(h)) == before + ENTRY_SIZE
    state = EntityState.from_bytes(record(h))
    assert state.recent[-1].id_hash == id_hash(huge) and len(state.recent[-1].id_hash) == 8
    assert send(h, price(stamper, 2, event_id=huge)).decision.outcome is Outcome.DUPLICATE


def test_record_at_32_ids_stays_small() -> None:
    """At a full history of 32 ids a price entity's record stays under 700 bytes (the first format: 3.3 KB)."""
    h = Harness()
    stamper = Stamper("pricing")
    for version in range(1, 40):
        assert send(h, price(stamper, version, 49.0 + version / 100)).decision.outcome is Outcome.VERIFIED
    state = EntityState.from_bytes(record(h))
    assert len(state.recent) == 32
    assert len(record(h)) <= 32 * ENTRY_SIZE + 200
    assert len(record(h)) <= 700


def test_a_record_of_the_earlier_format_is_read_and_rewritten_on_first_touch() -> None:
    """An orjson-list record still answers for its ids (a re-send is a duplicate, a reuse is id.reused), and the
    entity's next verified event writes it back in the packed format, keeping the old ids."""
    h = Harness()
    stamper = Stamper("pricing")
    first = price(stamper, 1, event_id="e-1")
    send(h, first)
    (key,) = h.state[ENTITIES]
    h.state[ENTITIES][key] = legacy(EntityState.from_bytes(record(h)), [("e-0", NOW - 5, None), ("e-1", NOW, 1)])
    assert record(h)[:1] == b"["
    assert send(h, first).decision.outcome is Outcome.DUPLICATE
    assert record(h)[:1] == b"["  # a duplicate writes nothing
    reused = send(h, price(stamper, 2, 51.0, event_id="e-1"))
    assert [r.code.value for r in reused.decision.reasons] == ["id.reused"]
    assert send(h, price(stamper, 2, 50.0, event_id="e-2")).decision.outcome is Outcome.VERIFIED
    assert record(h)[0] == FORMAT
    assert [s.id_hash for s in EntityState.from_bytes(record(h)).recent] == [id_hash(i) for i in ("e-0", "e-1", "e-2")]
    assert send(h, first).decision.outcome is Outcome.DUPLICATE


def test_ids_outside_the_window_are_dropped_when_the_record_is_written() -> None:
    """Only ids inside the idempotency window are carried into the next record."""
    h = Harness()
    stamper = Stamper("pricing")
    send(h, price(stamper, 1))
    send(h, price(stamper, 2, 50.0), now=NOW + 60)
    assert send(h, price(stamper, 3, 50.5, at=NOW + 86_400 + 30), now=NOW + 86_400 + 30).decision.outcome is \
        Outcome.VERIFIED
    assert [s.seen_at for s in EntityState.from_bytes(record(h)).recent] == [NOW + 60, NOW + 86_400 + 30]


TOO_LARGE = BASE_CONFIG.replace("routes:", "last_good_max_bytes: 100\nroutes:", 1)


def test_a_value_too_large_to_keep_is_forwarded_with_a_warning_and_not_kept() -> None:
    """A value over last_good_max_bytes is verified and forwarded, warned with state.last_good_too_large; the
    record keeps no value, says how large it was, and the last-known-good view says why there is none."""
    h = Harness(TOO_LARGE)
    stamper = Stamper("pricing")
    assert send(h, price(stamper, 1)).decision.outcome is Outcome.VERIFIED  # small: kept
    big = stamper.structured({**PRICE, "note": "n" * 200}, type="price.updated", subject="sku-1", version=2,
                             time=NOW)
    routed = send(h, big)
    assert routed.decision.outcome is Outcome.WARNED
    assert [r.code.value for r in routed.decision.reasons] == ["state.last_good_too_large"]
    assert routed.decision.reasons[0].severity.value == "warn"
    state = EntityState.from_bytes(record(h))
    assert state.last_good == b"" and state.last_good_dropped > 100 and state.version == 2
    outcome, body = describe_last_good(state, route=h.route, entity="sku-1", retention=86_400.0, now=NOW)
    assert outcome == NOT_FOUND and "larger than last_good_max_bytes" in body["detail"]
    # The next event has no last-known-good to compare with, and a small one is kept again.
    assert send(h, price(stamper, 3, 10.0)).decision.outcome is Outcome.VERIFIED
    assert EntityState.from_bytes(record(h)).last_good_data() == {**PRICE, "price": 10.0}


def test_a_value_within_the_bound_carries_no_warning() -> None:
    """A value at the bound is kept, without any state warning."""
    h = Harness(TOO_LARGE)
    routed = send(h, price(Stamper("pricing"), 1))
    assert routed.decision.reasons == () and EntityState.from_bytes(record(h)).last_good_dropped == 0


def test_a_warned_value_does_not_replace_the_last_known_good() -> None:
    """A price of 10 then 100 (price_jump warns): the last-known-good stays 10, and the next event is judged
    against 10; the entity's version still advances."""
    h = Harness()
    stamper = Stamper("pricing")
    send(h, price(stamper, 1, 10.0))
    jump = send(h, price(stamper, 2, 100.0))
    assert jump.decision.outcome is Outcome.WARNED
    state = EntityState.from_bytes(record(h))
    assert state.last_good_data() == {**PRICE, "price": 10.0} and state.version == 2
    again = send(h, price(stamper, 3, 100.0))
    assert again.decision.outcome is Outcome.WARNED  # still 10x the last-known-good
    assert send(h, price(stamper, 4, 11.0)).decision.outcome is Outcome.VERIFIED
    assert EntityState.from_bytes(record(h)).last_good_data() == {**PRICE, "price": 11.0}


def test_a_version_gap_alone_replaces_the_last_known_good() -> None:
    """A version gap (warn by default) says nothing against the value: 10 at version 1, then 11 at version 5
    is verified with the warning and becomes the last-known-good."""
    h = Harness()
    stamper = Stamper("pricing")
    send(h, price(stamper, 1, 10.0))
    gap = send(h, price(stamper, 5, 11.0))
    assert [r.code.value for r in gap.decision.reasons] == ["version.gap"]
    assert EntityState.from_bytes(record(h)).last_good_data() == {**PRICE, "price": 11.0}


def test_a_type_can_let_warned_values_replace_the_last_known_good() -> None:
    """With `last_good_on_warn: replace` on its type, a warned value becomes the last-known-good."""
    h = Harness(BASE_CONFIG.replace("      price.updated:\n",
                                    "      price.updated:\n        last_good_on_warn: replace\n"))
    stamper = Stamper("pricing")
    send(h, price(stamper, 1, 10.0))
    assert send(h, price(stamper, 2, 100.0)).decision.outcome is Outcome.WARNED
    assert EntityState.from_bytes(record(h)).last_good_data() == {**PRICE, "price": 100.0}


def test_merged_vector_clock_is_bounded() -> None:
    """An entity's merged clock keeps at most MERGED_CLOCK_MAX_ENTRIES writers: the event's own and then those
    with the highest counters."""
    entity = VectorClock({f"n{i:04d}": i + 1 for i in range(MERGED_CLOCK_MAX_ENTRIES)})
    event = VectorClock({"new": 1})
    merged = bounded_merge(event, entity)
    assert merged is not None
    kept = merged.to_dict()
    assert len(kept) == MERGED_CLOCK_MAX_ENTRIES and kept["new"] == 1 and "n0000" not in kept
    small = bounded_merge(VectorClock({"a": 2}), VectorClock({"a": 1, "b": 1}))
    assert small is not None and small.to_dict() == {"a": 2, "b": 1}


def test_long_types_and_clocks_fit() -> None:
    """A type or a clock of any length is written and read back (lengths are 32-bit)."""
    state = EntityState(1, VectorClock({"n" * 70_000: 1}), b"\x03" * 16, b"{}", "t" * 70_000, NOW, None)
    assert EntityState.from_bytes(state.to_bytes()) == state


@pytest.mark.parametrize("value", [b"", b"\x00\xff", "é".encode()])
def test_binary_and_empty_values_survive(value: bytes) -> None:
    """Any bytes are kept as the last-known-good value, exactly."""
    state = EntityState(None, None, b"\x02" * 16, value, "t", NOW, NOW - 1)
    assert EntityState.from_bytes(state.to_bytes()).last_good == value


def format_2(state: EntityState, ids: list[tuple[str, bytes, float, int | None]]) -> bytes:
    """`state` written in format 2 (40-byte entries: a 128-bit id hash, 8 bytes of content hash, seen at as a
    double, the version or -1), with these (id, content hash, seen at, version) entries."""
    kind = state.last_good_type.encode()
    clock = state.vclock.to_header() if state.vclock else b""
    flags = (1 if state.version is not None else 0) | (2 if state.event_time is not None else 0) | \
        (4 if state.vclock is not None else 0)
    header = struct.pack("<BBqdd16sIIII", 2, flags, state.version or 0, state.verified_at, state.event_time or 0.0,
                         state.content_hash, 0, len(kind), len(clock), len(state.last_good))
    entries = b"".join(struct.pack("<16s8sdq", xxhash.xxh3_128_digest(i.encode()), c[:8], t, -1 if v is None else v)
                       for i, c, t, v in ids)
    return header + kind + clock + state.last_good + entries


def test_a_record_of_format_2_is_read_and_rewritten_on_first_touch() -> None:
    """A format 2 record (40-byte entries) still answers for its ids: a re-send is a duplicate, a reuse is
    id.reused; the entity's next verified event writes it back in format 3 with the old ids kept."""
    h = Harness()
    stamper = Stamper("pricing")
    first = price(stamper, 1, event_id="e-1")
    send(h, first)
    (key,) = h.state[ENTITIES]
    state = EntityState.from_bytes(record(h))
    h.state[ENTITIES][key] = format_2(state, [("e-0", state.content_hash, NOW - 5, None),
                                              ("e-1", state.content_hash, NOW, 1)])
    assert record(h)[0] == 2
    assert send(h, first).decision.outcome is Outcome.DUPLICATE
    assert record(h)[0] == 2  # a duplicate writes nothing
    reused = send(h, price(stamper, 2, 51.0, event_id="e-1"))
    assert [r.code.value for r in reused.decision.reasons] == ["id.reused"]
    assert send(h, price(stamper, 2, 50.0, event_id="e-2")).decision.outcome is Outcome.VERIFIED
    assert record(h)[0] == FORMAT
    state = EntityState.from_bytes(record(h))
    assert [(s.id_hash, s.seen_at, s.version) for s in state.recent] == [
        (id_hash("e-0"), NOW - 5, None), (id_hash("e-1"), NOW, 1), (id_hash("e-2"), NOW, 2)]
    assert send(h, first).decision.outcome is Outcome.DUPLICATE


@pytest.mark.parametrize("versions", [
    [1, 2, 3, 4], [None, None, None], [3, None, 4], [1, 2, 5, 6], [7, 7, 8],
])
def test_every_layout_of_the_ids_reads_back(versions: list[int | None]) -> None:
    """Consecutive versions, none, or any others: each id reads back with its version, content and time."""
    entries = b""
    version: int | None = None
    for i, v in enumerate(versions):
        new_version = v if version is None or (v is not None and v > version) else version
        entries = new_entries(entries, f"e-{i}", bytes([i]) * 16, NOW + i * 0.5, v, now=NOW + i * 0.5,
                              window=86_400.0, keep=32, old_version=version, new_version=new_version)
        version = new_version
    state = EntityState(version, None, b"\x00" * 16, b"{}", "t", NOW, None, entries)
    state = EntityState.from_bytes(state.to_bytes())
    assert [(s.id_hash, s.content_hash, s.seen_at, s.version) for s in state.recent] == [
        (id_hash(f"e-{i}"), bytes([i]) * 4, NOW + i * 0.5, v) for i, v in enumerate(versions)]
    for i, v in enumerate(versions):
        seen = state.find(f"e-{i}", NOW + 10, 86_400.0)
        assert seen is not None and seen.version == v and seen.same_content(bytes([i]) * 16)
    consecutive = len(entries) == 5 + len(versions) * ENTRY_SIZE
    assert consecutive == (versions in ([1, 2, 3, 4], [None, None, None]))


def test_times_that_do_not_fit_milliseconds_are_kept_exactly() -> None:
    """Seen-at times more than 49 days apart (a long window) or before 1970 are kept as doubles."""
    entries = new_entries(b"", "a", b"\x01" * 16, -5.25, None, now=-5.25, window=1e9, keep=32)
    entries = new_entries(entries, "b", b"\x02" * 16, NOW, None, now=NOW, window=1e12, keep=32)
    state = EntityState(None, None, b"\x00" * 16, b"{}", "t", NOW, None, entries)
    assert [s.seen_at for s in state.recent] == [-5.25, NOW]
    assert state.find("a", NOW, 1e12) is not None and state.find("a", NOW, 1e9) is None


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(min_value=0, max_value=6_000_000),
                                st.one_of(st.none(), st.just("next"), st.integers(min_value=0, max_value=2**63 - 1))),
                      min_size=1, max_size=40),
       window=st.sampled_from([60.0, 86_400.0, 60 * 86_400.0]), keep=st.sampled_from([1, 3, 32]))
def test_the_ids_kept_are_those_of_a_plain_list(steps: list[tuple[int, int | str | None]], window: float,
                                                keep: int) -> None:
    """Whatever the versions and the time between events (gaps beyond the time base's reach included), the
    entries read back as a plain list of (id, content, seen at, version) kept by the same window and bound."""
    entries, version, now = b"", None, NOW
    model: list[tuple[bytes, bytes, float, int | None]] = []
    for i, (gap, choice) in enumerate(steps):
        now += gap
        v = (version + 1 if version is not None and version < 2**63 - 1 else 1) if choice == "next" else choice
        assert not isinstance(v, str)
        new_version = version if version is not None and (v is None or version > v) else v
        content = xxhash.xxh3_128_digest(b"%d" % i)
        entries = new_entries(entries, f"e-{i}", content, now, v, now=now, window=window, keep=keep,
                              old_version=version, new_version=new_version)
        model = [m for m in model if m[2] >= now - window][-(keep - 1) or len(model):] if keep > 1 else []
        model.append((id_hash(f"e-{i}"), content[:4], now, v))
        version = new_version
        state = EntityState(version, None, b"\x00" * 16, b"{}", "t", now, None, entries)
        assert [(s.id_hash, s.content_hash, s.seen_at, s.version) for s in state.recent] == model
