"""The processor seam: the verify and audit-join processors decide exactly as the functions they wrap, through a
partition's state views, and their punctuations close causal deadlines and audit windows."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from byzguard.audit import AuditRule, AuditSide, FieldPath, Kind, Observation, Side
from byzguard.clocks import VectorClock
from byzguard.envelope import Envelope
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, RecordIn, Result
from byzguard.processor import (
    PENDING,
    AuditJoinProcessor,
    AuditOutput,
    MemoryTable,
    State,
    VerifyProcessor,
    memory_state,
)
from byzguard.stamp import Stamped, Stamper
from byzguard.verdict import Code, Outcome

from .conftest import BASE_CONFIG, Harness
from .test_causal_delivery import CONFIG as CAUSAL_CONFIG
from .test_causal_delivery import history

NOW = 1_800_000_000.0


def edit(writer: str, event_id: str, clock: dict[str, int], data: Any = None, subject: str = "d") -> Stamped:
    """A doc.edited event of `subject` by `writer` with vector clock `clock`."""
    return Stamper(writer).binary(data if data is not None else {"id": event_id}, type="doc.edited", subject=subject,
                                  vclock=VectorClock(clock), lamport=False, event_id=event_id)


def record(stamped: Stamped, offset: int, now: float) -> RecordIn:
    """The record the agent builds for a consumed message (topic `in`, partition 0)."""
    return RecordIn(stamped.key, stamped.value, list(stamped.headers), "in", 0, offset, now)


def routed_view(result: Result) -> list[tuple[Any, ...]]:
    """Everything a result routes, the envelope by its public attributes (an Envelope compares by identity)."""
    def envelope(env: Envelope | None) -> tuple[Any, ...] | None:
        return None if env is None else tuple(getattr(env, name) for name in Envelope.__slots__
                                               if not name.startswith("_"))
    return [(r.record, r.decision, envelope(r.envelope), r.verified_headers, r.quarantine_headers)
            for r in result.routed]


def tables_of(state: dict[str, MemoryTable]) -> dict[str, dict[bytes, bytes]]:
    return {name: dict(table.data) for name, table in state.items()}


def harness_tables(h: Harness, names: tuple[str, ...]) -> dict[str, dict[bytes, bytes]]:
    return {name: dict(h.state[name]) for name in names}


def test_verify_processor_routes_and_writes_as_guard_process() -> None:
    """Clean, duplicate, reused-id, held and released events: the processor's results and state equal those of
    `Guard.process` applied by hand, event by event."""
    h = Harness(CAUSAL_CONFIG)
    processor = VerifyProcessor(h.guard, h.route)
    state = memory_state(processor.tables)
    cause, effect = edit("a", "cause", {"a": 1}), edit("b", "effect", {"a": 1, "b": 1})
    events = [
        edit("a", "first", {"a": 1}, subject="e"),  # clean
        edit("a", "first", {"a": 1}, subject="e"),  # the same again: a duplicate
        edit("a", "first", {"a": 1}, {"other": True}, subject="e"),  # same id, other content
        effect,  # held: its cause has not come
        cause,  # verified, and releases the effect
        edit("a", "late", {"a": 1, "b": 1}, subject="d"),  # nothing new under the clock delivered: stale
    ]
    outcomes = []
    for offset, stamped in enumerate(events):
        now = NOW + offset
        expected = h.apply(h.guard.process(record(stamped, offset, now), h.route, h.state, now=now))
        got = processor.process(record(stamped, offset, now), state, now)
        assert routed_view(got) == routed_view(expected)
        assert got.writes == expected.writes
        assert got.held_delta == expected.held_delta
        assert tables_of(state) == harness_tables(h, processor.tables)
        outcomes.append([r.decision.outcome for r in got.routed])
    assert outcomes == [[Outcome.VERIFIED], [Outcome.DUPLICATE], [Outcome.QUARANTINED], [Outcome.HELD],
                        [Outcome.VERIFIED, Outcome.VERIFIED], [Outcome.QUARANTINED]]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), order_seed=st.integers(0, 10_000))
def test_verify_processor_matches_guard_on_shuffled_causal_histories(seed: int, order_seed: int) -> None:
    """Over a shuffled causal history with punctuations in between, the processor routes and writes exactly what
    `Guard.process` and `Guard.expire_held` do."""
    h = Harness(CAUSAL_CONFIG)
    processor = VerifyProcessor(h.guard, h.route)
    state = memory_state(processor.tables)
    events = history(3, 12, seed)
    random.Random(order_seed).shuffle(events)
    for offset, stamped in enumerate(events):
        now = NOW + 4 * offset  # a deadline (10 s) passes every few events
        expected = h.apply(h.guard.process(record(stamped, offset, now), h.route, h.state, now=now))
        got = processor.process(record(stamped, offset, now), state, now)
        assert routed_view(got) == routed_view(expected)
        if offset % 2:
            expected = h.apply(h.guard.expire_held(h.route, h.state, now=now + 1))
            got = processor.punctuate(state, now + 1)
            assert routed_view(got) == routed_view(expected)
        assert tables_of(state) == harness_tables(h, processor.tables)


def test_verify_punctuate_quarantines_a_held_record_at_its_deadline() -> None:
    """A held record stays held by a punctuation before its deadline and is quarantined (causal.gap) by the first
    one after it, exactly as `Guard.expire_held` does; the buffer is empty afterwards."""
    h = Harness(CAUSAL_CONFIG)
    processor = VerifyProcessor(h.guard, h.route)
    state = memory_state(processor.tables)
    effect = record(edit("b", "effect", {"a": 1, "b": 1}), 0, NOW)
    h.apply(h.guard.process(effect, h.route, h.state, now=NOW))
    assert [r.decision.outcome for r in processor.process(effect, state, NOW).routed] == [Outcome.HELD]

    early = processor.punctuate(state, NOW + 9)
    assert early.routed == [] and early.oldest_held_age == 9
    assert early == h.apply(h.guard.expire_held(h.route, h.state, now=NOW + 9))

    due = processor.punctuate(state, NOW + 11)
    expected = h.apply(h.guard.expire_held(h.route, h.state, now=NOW + 11))
    assert routed_view(due) == routed_view(expected)
    assert (due.writes, due.held_delta, due.oldest_held_age) == (
        expected.writes, expected.held_delta, expected.oldest_held_age)
    assert [(r.decision.outcome, [x.code for x in r.decision.reasons]) for r in due.routed] == [
        (Outcome.QUARANTINED, [Code.CAUSAL_GAP])]
    assert due.routed[0].quarantine_headers is not None and due.held_delta == -1
    assert tables_of(state) == harness_tables(h, processor.tables)
    assert processor.punctuate(state, NOW + 20).routed == []


def test_verify_punctuate_interval_follows_the_causal_deadline() -> None:
    """A route with a causal buffer is punctuated every quarter of its deadline (0.5 to 5 s); one without has no
    punctuation, no causal table, and punctuating it changes nothing."""
    causal = Harness(CAUSAL_CONFIG)
    assert VerifyProcessor(causal.guard, causal.route).interval == 2.5
    plain = Harness(BASE_CONFIG)
    processor = VerifyProcessor(plain.guard, plain.route)
    assert processor.interval is None and processor.tables == (ENTITIES, LAMPORTS)
    state = memory_state(processor.tables)
    result = processor.punctuate(state, NOW)
    assert result.routed == [] and result.writes == {} and tables_of(state) == {ENTITIES: {}, LAMPORTS: {}}
    assert CAUSAL in VerifyProcessor(causal.guard, causal.route).tables


# -- the audit join ---------------------------------------------------------------------------------------------

def audit_rule(within: float = 10.0, grace: float = 1.0) -> AuditRule:
    """Every confirmed order has a captured payment of the same amount, same paymentId, within `within` s."""
    return AuditRule("orders_paid",
                     AuditSide("orders", "orders.verified", "order.confirmed", FieldPath.parse("data.paymentId"),
                               FieldPath.parse("data.total")),
                     AuditSide("payments", "payments.verified", "payment.captured", FieldPath.parse("data.paymentId"),
                               FieldPath.parse("data.amount")),
                     within, grace=grace)


def order(key: str, total: Any, at: float) -> Observation:
    return Observation(Side.LEFT, key, f"order-{key}", f"ev-order-{key}", at, total, True)


def payment(key: str, amount: Any, at: float) -> Observation:
    return Observation(Side.RIGHT, key, f"pay-{key}", f"ev-pay-{key}", at, amount, True)


ORDERS = ("orders.verified", 0)
PAYMENTS = ("payments.verified", 0)


def _drained_punctuation(processor: AuditJoinProcessor, state: State, now: float) -> AuditOutput:
    """A punctuation at wall time `now` of a join whose source partitions (the two sides' and any heard from) were
    drained through `now` (the side reads found nothing of them pending upstream)."""
    processor.watermark.know([ORDERS, PAYMENTS])
    for source in list(processor.watermark.sources):
        processor.watermark.drained(source, now)
    return processor.punctuate(state, now)


def test_audit_punctuate_closes_a_window_that_ended() -> None:
    """An order with no payment waits through a punctuation inside its window (and grace), and the first
    punctuation after it (its sources drained: the watermark moved on with the wall clock) reports it missing
    and removes its join state."""
    processor = AuditJoinProcessor(audit_rule(within=10.0, grace=1.0))
    state = memory_state(processor.tables)
    assert processor.process(order("p1", 100, NOW), state, NOW).checks == []
    assert state[PENDING].get(b"p1") is not None

    assert _drained_punctuation(processor, state, NOW).checks == []
    assert _drained_punctuation(processor, state, NOW + 10.5).checks == []  # the window ended, the grace did not
    closed = _drained_punctuation(processor, state, NOW + 12)
    assert [(c.key, c.discrepancy.kind if c.discrepancy else None) for c in closed.checks] == [("p1", Kind.MISSING)]
    assert closed.checks[0].discrepancy is not None and closed.checks[0].discrepancy.detected_at == NOW + 12
    assert state[PENDING].get(b"p1") is None
    assert _drained_punctuation(processor, state, NOW + 30).checks == []


def test_audit_punctuate_closes_nothing_while_one_source_partition_is_behind() -> None:
    """The same order is not reported however far the orders' partition goes while the payments' partition is
    neither heard from nor drained (its watermark stays at the order's event time); a payment joined then, a
    second after the order in event time, pairs."""
    processor = AuditJoinProcessor(audit_rule(within=10.0, grace=1.0))
    state = memory_state(processor.tables)
    processor.watermark.know([ORDERS, PAYMENTS])
    processor.process(replace(order("p1", 100, NOW), origin=(*ORDERS, 0)), state, NOW)
    for offset, later in enumerate((12, 600, 3600), start=1):
        processor.process(replace(order(f"o{later}", 1, NOW + later), origin=(*ORDERS, offset)), state, NOW + later)
        processor.watermark.drained(ORDERS, NOW + later)
        assert processor.punctuate(state, NOW + later).checks == []
    [check] = processor.process(replace(payment("p1", 100, NOW + 1), origin=(*PAYMENTS, 0)), state, NOW + 3600).checks
    assert check.passed


def test_audit_process_pairs_and_checks_values() -> None:
    """A payment that agrees passes; one that disagrees is a mismatch; the pair is remembered, so the same
    payment again is not a second check."""
    processor = AuditJoinProcessor(audit_rule())
    state = memory_state(processor.tables)
    processor.process(order("p1", 100, NOW), state, NOW)
    processor.process(order("p2", 50, NOW), state, NOW)
    agreed = processor.process(payment("p1", "100.00", NOW + 1), state, NOW + 1)
    disagreed = processor.process(payment("p2", 49, NOW + 2), state, NOW + 2)
    assert [c.passed for c in agreed.checks] == [True]
    assert [c.discrepancy.kind for c in disagreed.checks if c.discrepancy] == [Kind.MISMATCH]
    assert processor.process(payment("p1", "100.00", NOW + 3), state, NOW + 3).checks == []


def test_audit_process_closes_the_keys_own_expired_window_first() -> None:
    """An observation on a key whose earlier order waited past its window reports that order missing before it
    is itself kept (by the partition's watermark, less the grace)."""
    processor = AuditJoinProcessor(audit_rule(within=10.0, grace=1.0))
    state = memory_state(processor.tables)
    processor.watermark.know([ORDERS, PAYMENTS])
    processor.process(replace(order("p1", 100, NOW), origin=(*ORDERS, 0)), state, NOW)
    processor.process(replace(order("p9", 100, NOW + 20), origin=(*ORDERS, 1)), state, NOW + 20)
    late = processor.process(replace(payment("p1", 100, NOW + 20), origin=(*PAYMENTS, 0)), state, NOW + 20)
    assert [c.discrepancy.kind for c in late.checks if c.discrepancy] == [Kind.MISSING]
    assert state[PENDING].get(b"p1") is not None  # the late payment waits for an order of its own


def test_audit_unreadable_join_state_is_reported_not_raised() -> None:
    """A join state this version cannot read is given up and named in the output; the join goes on."""
    processor = AuditJoinProcessor(audit_rule())
    state = {PENDING: MemoryTable({b"p1": b"[99, [], [], []]"})}
    out = processor.process(order("p1", 100, NOW), state, NOW)
    assert [key for key, _ in out.unreadable] == [b"p1"] and out.checks == []
    assert _drained_punctuation(processor, {PENDING: MemoryTable({b"p9": b"not json"})}, NOW).unreadable[0][0] == b"p9"


def test_audit_skips_an_observation_at_or_below_the_last_offset_joined_from_its_source() -> None:
    """An observation naming its verified record (`origin`) is joined once: the same offset again, or an older
    one, of its side and source partition is a repeat (`repeated`, no state change, no check); another source
    partition or side keeps its own offset; the offsets are table keys no punctuation reads as join state."""
    processor = AuditJoinProcessor(audit_rule(within=10.0, grace=1.0))
    state = memory_state(processor.tables)
    first = replace(order("p1", 100, NOW), origin=("verified", 0, 5))
    assert not processor.process(first, state, NOW).repeated
    before = dict(state[PENDING].items())
    assert processor.process(first, state, NOW).repeated
    assert processor.process(replace(order("p2", 1, NOW), origin=("verified", 0, 4)), state, NOW).repeated
    assert dict(state[PENDING].items()) == before
    assert not processor.process(replace(order("p3", 1, NOW), origin=("verified", 1, 4)), state, NOW).repeated
    assert not processor.process(replace(payment("p1", 100, NOW), origin=("verified", 0, 5)), state, NOW).repeated
    _drained_punctuation(processor, state, NOW)
    closed = _drained_punctuation(processor, state, NOW + 30)
    assert closed.unreadable == [] and sorted(c.key for c in closed.checks) == ["p3"]


def test_audit_watermark_and_source_progress_are_kept_in_the_join_table_and_resumed_from_it() -> None:
    """The join keeps its watermark and each source partition's progress in its table under source-prefixed keys
    no punctuation reads as join state (written when they moved, alone only once they moved by more than
    `step`), and a new processor resumes them; a watermark it cannot read, or none, resumes at the newest
    observation time the table holds where it holds no progress either (the release before); where it holds
    progress, none until its sources are known, then the least progress (the newest observation may be ahead of a
    stalled source: windows would close early)."""
    from byzguard.processor import CLOCK_KEY, progress_key

    processor = AuditJoinProcessor(audit_rule(within=10.0, grace=1.0))
    state = memory_state(processor.tables)
    processor.watermark.know([ORDERS, PAYMENTS])
    processor.keep(state)
    assert state[PENDING].get(CLOCK_KEY) is None  # no time yet
    processor.process(replace(order("p1", 100, NOW), origin=(*ORDERS, 0)), state, NOW)
    processor.process(replace(payment("p2", 100, NOW - 5), origin=(*PAYMENTS, 0)), state, NOW)
    processor.keep(state)
    assert state[PENDING].get(CLOCK_KEY) == repr(NOW - 5).encode()
    assert state[PENDING].get(progress_key(ORDERS)) == repr(NOW).encode()
    processor.watermark.drained(PAYMENTS, NOW + 10)
    processor.keep(state, step=10.0)
    assert state[PENDING].get(CLOCK_KEY) == repr(NOW - 5).encode()  # moved by the step, not more: not written alone
    processor.watermark.drained(ORDERS, NOW + 10.5)
    processor.watermark.drained(PAYMENTS, NOW + 20)
    processor.keep(state, step=10.0)
    assert state[PENDING].get(CLOCK_KEY) == repr(NOW + 10.5).encode()
    assert state[PENDING].get(progress_key(PAYMENTS)) == repr(NOW + 10).encode()  # +15 s, not the +10 s after
    again = AuditJoinProcessor(audit_rule(within=10.0, grace=1.0))
    again.resume(state)
    assert again.watermark.time == NOW + 10.5 and again.punctuate(state, NOW).checks == []
    assert again.watermark.progress == {ORDERS: NOW + 10.5, PAYMENTS: NOW + 10}
    for stored in (b"not a time", b"inf", b"nan"):
        state[PENDING].put(CLOCK_KEY, stored)
        fresh = AuditJoinProcessor(audit_rule(within=10.0, grace=1.0))
        fresh.resume(state)
        assert fresh.watermark.time is None  # its sources not known yet
        fresh.watermark.know([ORDERS, PAYMENTS])
        assert fresh.watermark.time == NOW + 10  # the least progress: the payments'
    state[PENDING].delete(CLOCK_KEY)
    for source in (ORDERS, PAYMENTS):  # a table of the release before: no progress
        state[PENDING].delete(progress_key(source))
    again.resume(state)
    assert again.watermark.time == NOW  # the newest observation: the order (the payment is older)
    empty = AuditJoinProcessor(audit_rule())
    empty.resume(memory_state(empty.tables))
    assert empty.watermark.time is None and empty.punctuate(memory_state(empty.tables), NOW).checks == []


def test_audit_join_state_of_the_release_before_resumes_its_stream_time_as_the_watermark() -> None:
    """A table written by the release before (its stream time under the clock key, no source progress) resumes it
    as the watermark, which moves on only once every source partition is past it: a source the old stream time
    did not wait for cannot close a window at once."""
    from byzguard.processor import CLOCK_KEY, SOURCE_PREFIX

    old = {CLOCK_KEY: repr(NOW).encode(), SOURCE_PREFIX + b"left\x00orders.verified\x000": b"7",
           b"p1": b'[1, [["left", "p1", "order-p1", "ev-order-p1", %r, 100, true]], [], []]' % (NOW - 5)}
    state = {PENDING: MemoryTable(dict(old))}
    processor = AuditJoinProcessor(audit_rule(within=10.0, grace=1.0))
    processor.resume(state)
    processor.watermark.know([ORDERS, PAYMENTS])
    assert processor.watermark.time == NOW and processor.punctuate(state, NOW).checks == []
    assert processor.process(replace(order("p1", 100, NOW - 5), origin=(*ORDERS, 7)), state, NOW).repeated
    processor.process(replace(order("p3", 1, NOW + 60), origin=(*ORDERS, 8)), state, NOW + 60)
    assert processor.punctuate(state, NOW + 60).checks == []  # the payments' partition holds it at NOW
    processor.watermark.drained(PAYMENTS, NOW + 60)
    [missing] = processor.punctuate(state, NOW + 60).checks
    assert missing.key == "p1" and missing.discrepancy is not None and missing.discrepancy.kind is Kind.MISSING
