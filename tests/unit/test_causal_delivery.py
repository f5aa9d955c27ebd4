"""Causal delivery in the guard: early events are held, released in causal order, expired as causal.gap."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from byzguard.clocks import VectorClock
from byzguard.stamp import Stamped, Stamper
from byzguard.verdict import Outcome

from .conftest import Harness

NOW = 1_800_000_000.0
CONFIG = """
routes:
  - name: causal
    inputs: [in]
    verified_topic: out
    quarantine_topic: bad
    default_type: doc.edited
    types: {doc.edited: {}}
    causal: {buffer: true, deadline: 10s, max_held_per_scope: 4, max_held_total: 6}
"""


def history(writers: int, events: int, seed: int, entity: str = "doc-1") -> list[Stamped]:
    """A causal history of one entity: each writer merges what it has seen and ticks its own entry."""
    rng = random.Random(seed)
    seen = [VectorClock() for _ in range(writers)]
    log: list[Stamped] = []
    for n in range(events):
        w = rng.randrange(writers)
        if log and rng.random() < 0.7:  # usually the writer has read the latest state first
            seen[w] = seen[w].merge(VectorClock.from_header(dict(log[-1].headers)["ce_vectorclock"]))
        seen[w] = seen[w].tick(f"w{w}")
        stamper = Stamper(f"w{w}")
        log.append(stamper.binary({"n": n}, type="doc.edited", subject=entity, vclock=seen[w], lamport=False,
                                  event_id=f"e{n}"))
    return log


def happened_before(a: Stamped, b: Stamped) -> bool:
    """a -> b in the vector-clock order."""
    ca = VectorClock.from_header(dict(a.headers)["ce_vectorclock"])
    cb = VectorClock.from_header(dict(b.headers)["ce_vectorclock"])
    return cb.dominates(ca)


def delivered_ids(h: Harness, records: list[Stamped]) -> list[str]:
    """Feed records in the given order; the ids of verified records in the order they were released."""
    out = []
    for s in records:
        for routed in h.feed_all(s.key, s.value, s.headers, now=NOW).routed:
            if routed.decision.outcome is Outcome.VERIFIED:
                assert routed.envelope is not None
                out.append(routed.envelope.id)
    return out


def test_early_event_is_held_then_released_after_its_cause() -> None:
    """A reply that arrives before the message it answers is held, then delivered right after it."""
    h = Harness(CONFIG)
    first = Stamper("a").binary({"m": 1}, type="doc.edited", subject="d", vclock=VectorClock({"a": 1}),
                                lamport=False, event_id="cause")
    reply = Stamper("b").binary({"m": 2}, type="doc.edited", subject="d", vclock=VectorClock({"a": 1, "b": 1}),
                                lamport=False, event_id="effect")
    held = h.feed_all(reply.key, reply.value, reply.headers, now=NOW)
    assert [r.decision.outcome for r in held.routed] == [Outcome.HELD]
    assert held.first.verified_headers is None and held.first.quarantine_headers is None
    released = h.feed_all(first.key, first.value, first.headers, now=NOW + 1)
    assert [(r.envelope.id, r.decision.outcome) for r in released.routed if r.envelope] == [
        ("cause", Outcome.VERIFIED), ("effect", Outcome.VERIFIED)]
    assert released.routed[1].record.offset == 1  # released with its own coordinates


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), window=st.integers(1, 4))
def test_reordered_stream_comes_out_complete_and_causal(seed: int, window: int) -> None:
    """Any reordering within a small window delivers every event once, in an order consistent with causality."""
    log = history(writers=3, events=12, seed=seed)
    rng = random.Random(seed + 1)
    shuffled = list(log)
    for i in range(len(shuffled)):  # swap each event with one at most `window` positions later
        j = min(len(shuffled) - 1, i + rng.randrange(window + 1))
        shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
    # Writers that did not read the latest state write concurrently: allowed here, to exercise real causality.
    h = Harness(CONFIG.replace("max_held_per_scope: 4, max_held_total: 6", "max_held_per_scope: 50")
                .replace("types: {doc.edited: {}}", "types: {doc.edited: {codes: {vclock.concurrent: off}}}"))
    order = delivered_ids(h, shuffled)
    assert sorted(order) == sorted(s.event_id for s in log)
    position = {event_id: i for i, event_id in enumerate(order)}
    by_id = {s.event_id: s for s in log}
    for a in log:
        for b in log:
            if happened_before(a, b):
                assert position[a.event_id] < position[by_id[b.event_id].event_id]
    assert not h.state["causal"] or set(h.state["causal"]) == {b"\x00held-index"}


def test_missing_dependency_expires_exactly_its_dependents_as_causal_gap() -> None:
    """A dependency that never arrives: after the deadline exactly the events waiting on it are quarantined."""
    a = Stamper("a")
    b = Stamper("b")
    e1 = a.binary({"n": 1}, type="doc.edited", subject="d", vclock=VectorClock({"a": 1}), lamport=False,
                  event_id="a1")
    lost = a.binary({"n": 2}, type="doc.edited", subject="d", vclock=VectorClock({"a": 2}), lamport=False,
                    event_id="a2-lost")
    waits = b.binary({"n": 3}, type="doc.edited", subject="d", vclock=VectorClock({"a": 2, "b": 1}),
                     lamport=False, event_id="b1-waits")
    free = b.binary({"n": 4}, type="doc.edited", subject="e", vclock=VectorClock({"b": 1}), lamport=False,
                    event_id="other-entity")
    h = Harness(CONFIG)
    assert lost.event_id
    assert delivered_ids(h, [e1, waits, free]) == ["a1", "other-entity"]
    early = h.tick(now=NOW + 5)
    assert not early.routed  # not yet
    assert early.oldest_held_age == 5.0  # what the byzguard_causal_buffer_oldest_age_seconds gauge shows
    expired_tick = h.tick(now=NOW + 11)
    assert expired_tick.oldest_held_age == 0.0  # nothing is held any more
    expired = expired_tick.routed
    # With its envelope: the agent writes its final receipt and counts it under its type and source.
    assert [(r.envelope and (r.envelope.id, r.envelope.source), r.decision.outcome) for r in expired] == [
        (("b1-waits", "b"), Outcome.QUARANTINED)]
    reason = expired[0].decision.reasons[0]
    assert reason.code.value == "causal.gap" and "a 2" in reason.detail
    headers = dict(expired[0].quarantine_headers or [])
    assert headers["byzguard_original_offset"] == b"2"
    assert h.state["causal"] == {b"\x00held-index": b"{}"}


def test_duplicate_of_a_held_event_is_counted_not_held_twice() -> None:
    """The same early event delivered twice is held once; the second copy is a duplicate."""
    h = Harness(CONFIG)
    early = Stamper("b").binary({}, type="doc.edited", subject="d", vclock=VectorClock({"a": 1, "b": 1}),
                                lamport=False, event_id="x")
    assert h.feed(early.key, early.value, early.headers, now=NOW).decision.outcome is Outcome.HELD
    assert h.feed(early.key, early.value, early.headers, now=NOW).decision.outcome is Outcome.DUPLICATE


def test_buffer_is_bounded_per_entity_and_in_total() -> None:
    """Past the per-entity and per-partition bounds, early events are quarantined as causal.overflow."""
    h = Harness(CONFIG)
    outcomes = []
    for entity in ("d1", "d2"):
        for n in range(2, 7):  # a=1 never arrives: all early
            s = Stamper("a").binary({}, type="doc.edited", subject=entity, vclock=VectorClock({"a": n}),
                                    lamport=False, event_id=f"{entity}-{n}")
            routed = h.feed(s.key, s.value, s.headers, now=NOW)
            outcomes.append((entity, routed.decision.outcome, [r.code.value for r in routed.decision.reasons],
                             [r.detail for r in routed.decision.reasons]))
    held = [o for o in outcomes if o[1] is Outcome.HELD]
    overflow = [o for o in outcomes if o[2] == ["causal.overflow"]]
    assert len(held) == 6  # 4 for d1 (per-entity bound), then 2 for d2 (total bound 6)
    assert len(overflow) == 4
    assert overflow[0][3][0].startswith("causal buffer full for this entity (4 held)")
    assert overflow[-1][3][0].startswith("causal buffer full for this partition (6 held in partition 0)")


def test_buffer_is_bounded_in_bytes_per_entity() -> None:
    """Held records live in their entity's state record, which must fit its changelog: past max_held_bytes an
    early event is quarantined as causal.overflow, however few are held."""
    h = Harness(CONFIG.replace("max_held_total: 6}", "max_held_total: 6, max_held_bytes: 300000}"))
    outcomes = []
    for n in range(2, 5):  # a=1 never arrives: all early, about 134 KB each once held (base64)
        s = Stamper("a").binary({"blob": "x" * 100_000}, type="doc.edited", subject="d1",
                                vclock=VectorClock({"a": n}), lamport=False, event_id=f"big-{n}")
        routed = h.feed(s.key, s.value, s.headers, now=NOW)
        outcomes.append((routed.decision.outcome, [r.detail for r in routed.decision.reasons]))
    assert [o[0] for o in outcomes] == [Outcome.HELD, Outcome.HELD, Outcome.QUARANTINED]
    assert outcomes[2][1][0].startswith("causal buffer full for this entity (300000 bytes of held records at most)")


def test_concurrent_events_are_not_held() -> None:
    """An event concurrent with the verified clock is judged now by vclock.concurrent, not held."""
    h = Harness(CONFIG)
    for s in (Stamper("a").binary({}, type="doc.edited", subject="d", vclock=VectorClock({"a": 1}), lamport=False),
              Stamper("b").binary({}, type="doc.edited", subject="d", vclock=VectorClock({"b": 1}), lamport=False)):
        routed = h.feed(s.key, s.value, s.headers, now=NOW)
    assert routed.decision.outcome is Outcome.QUARANTINED
    assert [r.code.value for r in routed.decision.reasons] == ["vclock.concurrent"]


def test_released_event_is_not_a_lamport_regression() -> None:
    """A held event's Lamport time is judged on arrival: later events of its source do not make it regress."""
    h = Harness(CONFIG)
    a = Stamper("a", lamport=10)
    b = Stamper("b", lamport=1)
    cause = b.binary({}, type="doc.edited", subject="d", vclock=VectorClock({"b": 1}), event_id="b1")
    waits = a.binary({}, type="doc.edited", subject="d", vclock=VectorClock({"a": 1, "b": 1}), event_id="a1")
    later = a.binary({}, type="doc.edited", subject="other", vclock=VectorClock({"a": 1}), event_id="a-other")
    assert h.feed(waits.key, waits.value, waits.headers, now=NOW).decision.outcome is Outcome.HELD
    assert h.feed(later.key, later.value, later.headers, now=NOW).decision.outcome is Outcome.VERIFIED
    released = h.feed_all(cause.key, cause.value, cause.headers, now=NOW).routed
    assert [(r.envelope.id, r.decision.outcome) for r in released if r.envelope] == [
        ("b1", Outcome.VERIFIED), ("a1", Outcome.VERIFIED)]


def test_held_event_with_a_regressed_lamport_time_is_judged_at_once() -> None:
    """An early event whose Lamport time already regressed is quarantined on arrival, not held."""
    h = Harness(CONFIG)
    a = Stamper("a", lamport=10, clock=None)
    first = a.binary({}, type="doc.edited", subject="x", vclock=VectorClock({"a": 1}), event_id="x1")
    h.feed(first.key, first.value, first.headers, now=NOW)
    a.lamport = 2
    early = a.binary({}, type="doc.edited", subject="d", vclock=VectorClock({"a": 1, "b": 1}), event_id="d1")
    routed = h.feed(early.key, early.value, early.headers, now=NOW)
    assert routed.decision.outcome is Outcome.QUARANTINED
    assert "lamport.regression" in [r.code.value for r in routed.decision.reasons]


def test_unlisted_type_is_refused_at_once_not_held() -> None:
    """An early event of a type the route does not list is quarantined as type.unlisted when it arrives: it
    neither waits in the buffer (nor fills it) nor expires later as causal.gap."""
    h = Harness(CONFIG)
    early = Stamper("b").binary({}, type="doc.deleted", subject="d", vclock=VectorClock({"a": 1, "b": 1}),
                                lamport=False, event_id="x")
    routed = h.feed(early.key, early.value, early.headers, now=NOW)
    assert routed.decision.outcome is Outcome.QUARANTINED
    assert [r.code.value for r in routed.decision.reasons] == ["type.unlisted"]
    assert not h.state["causal"]
