"""Causal delivery: classification, holding and release, expiry, and delivery in any arrival order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from byzguard.causal import (
    CausalBuffer,
    Deliverability,
    HeldEvent,
    classify,
    expire,
    missing,
    offer,
    oldest_held_age,
)
from byzguard.clocks import Order, VectorClock

BIG = 10_000  # a max_held that never binds


def vc(**entries: int) -> VectorClock:
    return VectorClock(entries)


def ev(source: str, *, at: float = 0.0, payload: bytes = b"", **clock: int) -> HeldEvent:
    """An event named after its source and own counter, e.g. a2."""
    c = VectorClock(clock)
    return HeldEvent(f"{source}{c.get(source)}", source, c, at, payload)


def ids(events: list[HeldEvent] | tuple[HeldEvent, ...]) -> list[str]:
    return [e.event_id for e in events]


def offer_all(
    events: list[HeldEvent], buf: CausalBuffer | None = None
) -> tuple[CausalBuffer, list[HeldEvent]]:
    """Offer events in the given order, one per second, and collect everything released."""
    buf = buf or CausalBuffer()
    released: list[HeldEvent] = []
    for t, e in enumerate(events):
        result = offer(buf, e, now=float(t), max_held=BIG)
        assert result.status in (Deliverability.DELIVERABLE, Deliverability.EARLY), (e, result.status)
        buf = result.buffer
        released.extend(result.released)
    return buf, released


# --- classification ---------------------------------------------------------------------------------------

D = vc(a=1, b=2)


@pytest.mark.parametrize(("source", "clock", "expected"), [
    ("a", vc(a=2, b=1), Deliverability.DELIVERABLE),  # next of a, saw older b
    ("a", vc(a=2, b=2), Deliverability.DELIVERABLE),  # next of a, saw all of b
    ("b", vc(b=3), Deliverability.DELIVERABLE),  # concurrent with D but still next of b
    ("c", vc(c=1, a=1), Deliverability.DELIVERABLE),  # first event of a new source
    ("a", vc(a=3), Deliverability.EARLY),  # a2 missing
    ("a", vc(a=2, b=3), Deliverability.EARLY),  # b3 missing
    ("c", vc(c=2), Deliverability.EARLY),  # c1 missing
    ("a", vc(a=1), Deliverability.STALE),  # dominated
    ("a", vc(a=1, b=2), Deliverability.STALE),  # equal
    ("b", vc(b=1), Deliverability.STALE),  # older
    ("a", vc(a=1, b=3), Deliverability.INVALID),  # a1 was delivered with another history: equivocation
    ("a", vc(b=3), Deliverability.INVALID),  # the source does not count its own event
    ("a", vc(), Deliverability.INVALID),
])
def test_classify_examples(source: str, clock: VectorClock, expected: Deliverability) -> None:
    """Against D = {a:1, b:2}, classify says deliverable, early, stale or invalid per the BSS condition."""
    assert classify(D, source, clock) is expected


def test_missing_lists_undelivered_ranges() -> None:
    """missing names each absent run: the source's earlier counters, and other nodes up to the clock."""
    assert missing(D, "a", vc(a=4, b=5, c=1)) == [("a", 2, 3), ("b", 3, 5), ("c", 1, 1)]
    assert missing(D, "a", vc(a=2, b=2)) == []
    assert missing(vc(), "b", vc(b=1)) == []


# --- offer -----------------------------------------------------------------------------------------------


def test_deliverable_event_is_released_and_merged() -> None:
    """A deliverable event comes straight back in `released` and its clock is merged into delivered."""
    result = offer(CausalBuffer(), ev("a", a=1), now=0.0, max_held=BIG)
    assert result.status is Deliverability.DELIVERABLE
    assert ids(result.released) == ["a1"]
    assert result.buffer.delivered == vc(a=1)
    assert result.overflow is None and not result.stale


def test_held_event_released_when_dependency_arrives() -> None:
    """An early event is held, then released in the same call that delivers its dependency."""
    r1 = offer(CausalBuffer(), ev("b", a=1, b=1), now=5.0, max_held=BIG)
    assert r1.status is Deliverability.EARLY and r1.released == []
    assert ids(r1.buffer.held) == ["b1"] and r1.buffer.held[0].held_at == 5.0
    r2 = offer(r1.buffer, ev("a", a=1), now=6.0, max_held=BIG)
    assert ids(r2.released) == ["a1", "b1"]
    assert r2.buffer.held == () and r2.buffer.delivered == vc(a=1, b=1)


def test_chain_in_reverse_order_is_released_in_causal_order() -> None:
    """a1 -> a2 -> b1 arriving as b1, a2, a1 are all released by a1's arrival, in causal order."""
    a1, a2, b1 = ev("a", a=1), ev("a", a=2), ev("b", a=2, b=1)
    buf, released = offer_all([b1, a2, a1])
    assert ids(released) == ["a1", "a2", "b1"]
    assert buf.held == () and buf.delivered == vc(a=2, b=1)


def test_concurrent_releases_go_longest_held_first() -> None:
    """When several held events become deliverable together, the one held longest is released first."""
    a1, b1, c1 = ev("a", a=1), ev("b", a=1, b=1), ev("c", a=1, c=1)
    _, released = offer_all([c1, b1, a1])
    assert ids(released) == ["a1", "c1", "b1"]


def test_stale_event_changes_nothing() -> None:
    """An event dominated by delivered is reported stale and the very same buffer comes back."""
    buf, _ = offer_all([ev("a", a=1), ev("a", a=2)])
    result = offer(buf, ev("a", a=1), now=9.0, max_held=BIG)
    assert result.stale and result.status is Deliverability.STALE
    assert result.buffer is buf and result.released == [] and result.overflow is None


def test_duplicate_of_held_event_is_stale_and_equivocation_is_invalid() -> None:
    """Re-offering a held event is stale; a different clock for the same source and counter is invalid."""
    buf, _ = offer_all([ev("a", a=2)])
    again = offer(buf, ev("a", a=2), now=1.0, max_held=BIG)
    assert again.stale and again.buffer is buf
    forked = offer(buf, ev("a", a=2, b=1), now=1.0, max_held=BIG)
    assert forked.status is Deliverability.INVALID and forked.buffer is buf


def test_overflow_at_bound_returns_rejected_event() -> None:
    """When max_held events are already held, the next early event is returned as overflow, not held."""
    buf, _ = offer_all([ev("a", a=3), ev("b", b=2)])
    extra = ev("c", c=2)
    result = offer(buf, extra, now=3.0, max_held=2)
    assert result.overflow is extra and result.status is Deliverability.EARLY
    assert result.buffer is buf and len(result.buffer.held) == 2
    # A deliverable event is not limited by the bound: it does not need a slot.
    assert ids(offer(buf, ev("c", c=1), now=3.0, max_held=2).released) == ["c1"]


# --- expire ----------------------------------------------------------------------------------------------


def test_expire_returns_missing_ranges_and_keeps_younger_events() -> None:
    """Events past the deadline come out with their missing ranges; younger ones and dependents stay."""
    buf = CausalBuffer()
    buf = offer(buf, ev("a", a=3), now=0.0, max_held=BIG).buffer  # needs a1, a2
    buf = offer(buf, ev("b", a=3, b=1), now=8.0, max_held=BIG).buffer  # needs a1..a3
    buf, expired = expire(buf, now=10.0, deadline_s=5.0)
    assert [(e.event_id, gaps) for e, gaps in expired] == [("a3", [("a", 1, 2)])]
    assert ids(buf.held) == ["b1"]
    # b1 stays held after a3 expired, and is released if the missing events do arrive.
    _, released = offer_all([ev("a", a=1), ev("a", a=2), ev("a", a=3)], buf)
    assert ids(released) == ["a1", "a2", "a3", "b1"]


def test_expire_with_nothing_due_returns_same_buffer() -> None:
    """expire leaves the buffer as it is when no event has reached its deadline."""
    buf, _ = offer_all([ev("a", a=2)])
    same, expired = expire(buf, now=1.0, deadline_s=5.0)
    assert same is buf and expired == []


def test_oldest_held_age() -> None:
    """The age gauge is the wait of the longest-held event, and 0 when nothing is held."""
    assert oldest_held_age(CausalBuffer(), now=100.0) == 0.0
    buf = offer(CausalBuffer(), ev("a", a=2), now=40.0, max_held=BIG).buffer
    buf = offer(buf, ev("b", b=2), now=70.0, max_held=BIG).buffer
    assert oldest_held_age(buf, now=100.0) == 60.0


# --- serialization ----------------------------------------------------------------------------------------


def test_serialization_round_trip() -> None:
    """to_bytes/from_bytes reproduce delivered and every held event, binary payloads included."""
    buf = CausalBuffer(
        delivered=vc(a=2, **{"zürich": 1}),
        held=(
            HeldEvent("e-1", "a", vc(a=4, b=1), 1717000000.125, bytes(range(256))),
            HeldEvent("é\"\\", "b", vc(b=3), 3.0, b""),
        ),
    )
    assert CausalBuffer.from_bytes(buf.to_bytes()) == buf
    assert CausalBuffer.from_bytes(CausalBuffer().to_bytes()) == CausalBuffer()


@pytest.mark.parametrize("raw", [
    b"", b"{}", b"[2,\"\",[]]", b"[1,\"a=x\",[]]", b"[1,\"\",[[\"id\",\"a\",\"a=1\",0.0,\"@@\"]]]",
    b"[1,\"\",[[\"id\",\"a\",\"a=1\",\"now\",\"\"]]]", b"[1,\"\",[[\"id\",\"a\"]]]",
])
def test_from_bytes_rejects_corrupt_state(raw: bytes) -> None:
    """Bytes that are not a serialized buffer raise ValueError instead of yielding a half-built state."""
    with pytest.raises(ValueError, match="corrupt causal buffer state"):
        CausalBuffer.from_bytes(raw)


# --- properties over random causal histories ------------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> list[HeldEvent]:
    """A causal history: each event's clock is the merge of what its source has seen, ticked."""
    sources = "abcd"[: draw(st.integers(1, 4))]
    seen = {s: VectorClock() for s in sources}
    events: list[HeldEvent] = []
    for _ in range(draw(st.integers(1, 14))):
        s = draw(st.sampled_from(sources))
        if len(events) > 0 and draw(st.booleans()):  # receive an earlier event first
            seen[s] = seen[s].merge(draw(st.sampled_from(events)).clock)
        seen[s] = seen[s].tick(s)
        events.append(HeldEvent(f"{s}{seen[s].get(s)}", s, seen[s], 0.0, s.encode()))
    return events


def happened_before(a: HeldEvent, b: HeldEvent) -> bool:
    return a.clock.compare(b.clock) is Order.BEFORE


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_arrival_order_delivers_each_event_once_in_causal_order(data: st.DataObject) -> None:
    """In any arrival order every event is released exactly once, causally ordered, nothing left held."""
    events = data.draw(histories())
    arrival = data.draw(st.permutations(events))
    buf, released = offer_all(arrival)
    assert sorted(ids(released)) == sorted(ids(events))
    position = {e.event_id: i for i, e in enumerate(released)}
    for a in events:
        for b in events:
            if happened_before(a, b):
                assert position[a.event_id] < position[b.event_id]
    assert buf.held == ()
    everything = VectorClock()
    for e in events:
        everything = everything.merge(e.clock)
    assert buf.delivered == everything
    for e in events:
        again = offer(buf, e, now=99.0, max_held=BIG)
        assert again.stale and again.buffer is buf


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_dropped_event_holds_exactly_its_causal_successors(data: st.DataObject) -> None:
    """With one event lost, exactly the events after it stay held and expire naming it as missing."""
    events = data.draw(histories())
    dropped = data.draw(st.sampled_from(events))
    rest = [e for e in events if e is not dropped]
    buf, released = offer_all(data.draw(st.permutations(rest)))
    after = {e.event_id for e in rest if happened_before(dropped, e)}
    assert {e.event_id for e in buf.held} == after
    assert set(ids(released)) == {e.event_id for e in rest} - after
    buf, expired = expire(buf, now=1000.0, deadline_s=60.0)
    assert buf.held == ()
    assert {e.event_id for e, _ in expired} == after
    for _, gaps in expired:
        assert any(node == dropped.source and lo <= dropped.counter <= hi for node, lo, hi in gaps)
