"""A batch processed stage by stage (VerifyProcessor.process_batch: Guard.prepare's decode and MAC passes over the
batch, then Guard.process of each record in order) decides, routes and writes exactly as VerifyProcessor.process
record by record, every record reading the writes of those before it in the batch."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import events as bench_events
from bench.core import _config
from byzguard.clocks import VectorClock
from byzguard.config import GuardConfig
from byzguard.guard import Guard, RecordIn, Result
from byzguard.integrity import HMAC_SHA256, Key
from byzguard.partitioner import partition_for
from byzguard.processor import MemoryTable, VerifyProcessor, _apply, memory_state
from byzguard.stamp import Stamper
from byzguard.verdict import Outcome

from .conftest import Harness
from .test_causal_delivery import CONFIG as CAUSAL_CONFIG
from .test_causal_delivery import history
from .test_processor import routed_view, tables_of

AT = 1_780_000_000.0
NOW = AT + 1.0


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> GuardConfig:
    return _config(Path(tmp_path_factory.mktemp("batch")))


def _pool() -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """Records of the bench route: three entities' versions 1-4 of one writer (Lamport times in that order), a
    second writer of the same entities, both modes, and faults: tampered, not JSON, empty, unknown key, another
    source, an old time, a future time, a rule violation."""
    main = bench_events.stamper()
    other = Stamper(bench_events.SOURCE, algorithm=HMAC_SHA256,
                    key=Key(bench_events.KEY_ID, bench_events.SOURCE, bench_events.SECRET.encode()))
    stranger = Stamper("stranger", algorithm=HMAC_SHA256, key=Key("nobody", "stranger", b"x" * 32))
    pool: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    for version in range(1, 5):
        for entity in range(3):
            make = main.structured if entity != 2 else main.binary
            s = make(bench_events.price_data(entity, version, AT), type=bench_events.EVENT_TYPE,
                     subject=f"sku-{entity}", version=version, time=AT,
                     vclock=VectorClock({bench_events.SOURCE: version}))
            pool.append((s.key, s.value, list(s.headers)))
    for entity, version in ((0, 2), (1, 5)):
        s = other.structured(bench_events.price_data(entity, version, AT), type=bench_events.EVENT_TYPE,
                             subject=f"sku-{entity}", version=version, time=AT)
        pool.append((s.key, s.value, list(s.headers)))
    key, value, headers = pool[0]
    assert value is not None
    pool.append((key, value.replace(b'"USD"', b'"JPY"'), headers))  # a copy tampered in transit
    s = main.structured(bench_events.price_data(1, 5, AT), type=bench_events.EVENT_TYPE, subject="sku-1", version=5,
                        time=AT, vclock=VectorClock({bench_events.SOURCE: 5}))
    pool.append((s.key, s.value.replace(b'"EUR"', b'"GBP"'), list(s.headers)))  # a new one, tampered
    pool.append((b"k", b"{not json", []))
    pool.append((b"k", None, []))
    s = stranger.structured({"price": 1.0}, type=bench_events.EVENT_TYPE, subject="sku-0", version=9, time=AT)
    pool.append((s.key, s.value, list(s.headers)))
    for time, data in ((AT - 200_000.0, bench_events.price_data(1, 3, AT)), (AT + 600.0, None),
                       (AT, {**bench_events.price_data(0, 3, AT), "price": -5.0})):
        s = main.structured(data or bench_events.price_data(2, 3, AT), type=bench_events.EVENT_TYPE,
                            subject=f"sku-{len(pool) % 3}", version=3, time=time)
        pool.append((s.key, s.value, list(s.headers)))
    return pool


POOL = _pool()


def _same(got: list[Result], want: list[Result], state: dict[str, MemoryTable],
          expected: dict[str, MemoryTable]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert routed_view(g) == routed_view(w)
        assert [(r.decision.lamport, r.decision.entity) for r in g.routed] == \
            [(r.decision.lamport, r.decision.entity) for r in w.routed]
        assert list(g.writes.items()) == list(w.writes.items())  # the same writes, in the same order
        assert g.held_delta == w.held_delta
    assert {n: t.data for n, t in state.items()} == {n: t.data for n, t in expected.items()}


@settings(max_examples=200, deadline=None)
@given(picks=st.lists(st.integers(0, len(POOL) - 1), max_size=40), cuts=st.lists(st.integers(1, 12), max_size=8))
def test_batch_decides_routes_and_writes_as_record_by_record(config: GuardConfig, picks: list[int],
                                                             cuts: list[int]) -> None:
    """Any sequence of the pool's records (repeats: duplicates; any order: version gaps, Lamport regressions; two
    events of one entity and several of one writer in one batch), cut into batches anyhow: process_batch gives
    each record the very outcome, reasons, headers (bytes), Lamport mark, next state and writes (in order) of
    `process` record by record, and leaves the same tables."""
    guard = Guard(config)
    route = config.routes[0]
    one, batched = VerifyProcessor(guard, route), VerifyProcessor(guard, route)
    expected, state = memory_state(one.tables), memory_state(batched.tables)
    records = [RecordIn(*POOL[i], "in", 0, offset, AT) for offset, i in enumerate(picks)]
    start = 0
    for cut in [*cuts, len(records)]:
        batch = records[start:start + cut]
        want = [one.process(record, expected, NOW) for record in batch]
        _same(batched.process_batch(batch, state, NOW), want, state, expected)
        start += cut
        if start >= len(records):
            break


def test_batch_of_one_entity_and_writer_sees_its_own_earlier_writes(config: GuardConfig) -> None:
    """Versions 1-4 of one entity in one batch: each is verified against the state the one before wrote (and the
    writer's Lamport mark it moved); the same batch again is all duplicates."""
    guard = Guard(config)
    processor = VerifyProcessor(guard, config.routes[0])
    state = memory_state(processor.tables)
    batch = [RecordIn(*POOL[3 * v], "in", 0, v, AT) for v in range(4)]
    results = processor.process_batch(batch, state, NOW)
    assert [r.first.decision.outcome for r in results] == [Outcome.VERIFIED] * 4
    assert [r.first.decision.lamport for r in results] == sorted(r.first.decision.lamport for r in results)
    again = processor.process_batch(batch, state, NOW)
    assert [r.first.decision.outcome for r in again] == [Outcome.DUPLICATE] * 4


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), order_seed=st.integers(0, 10_000), size=st.integers(1, 8))
def test_batch_holds_and_releases_as_record_by_record(seed: int, order_seed: int, size: int) -> None:
    """A shuffled causal history in batches: held records, and those an event of the same batch releases, come
    out as record by record (a released record is decoded when released, as before)."""
    h = Harness(CAUSAL_CONFIG)
    one, batched = VerifyProcessor(h.guard, h.route), VerifyProcessor(h.guard, h.route)
    expected, state = memory_state(one.tables), memory_state(batched.tables)
    events = history(3, 12, seed)
    random.Random(order_seed).shuffle(events)
    records = [RecordIn(s.key, s.value, list(s.headers), "in", 0, offset, NOW) for offset, s in enumerate(events)]
    outcomes: list[Any] = []
    for start in range(0, len(records), size):
        batch = records[start:start + size]
        want = [one.process(record, expected, NOW) for record in batch]
        _same(batched.process_batch(batch, state, NOW), want, state, expected)
        outcomes += [r.decision.outcome for w in want for r in w.routed]
    assert Outcome.VERIFIED in outcomes


def test_prepared_record_is_decided_as_without(config: GuardConfig) -> None:
    """Guard.process with what Guard.prepare made of the record equals Guard.process alone, for every pool record."""
    guard = Guard(config)
    route = config.routes[0]
    records = [RecordIn(*r, "in", 0, offset, AT) for offset, r in enumerate(POOL)]
    prepared = guard.prepare(records, route)
    outcomes = set()
    for record, prep in zip(records, prepared, strict=True):
        state = memory_state(("entities", "lamports"))
        want = guard.process(record, route, state, now=NOW)
        got = guard.process(record, route, state, now=NOW, prepared=prep)
        assert routed_view(got) == routed_view(want)
        assert got.writes == want.writes
        outcomes.add(got.first.decision.outcome)
    assert {Outcome.VERIFIED, Outcome.QUARANTINED} <= outcomes


def _placed_somehow(rng: random.Random, raw: tuple[bytes | None, bytes | None, list[tuple[str, bytes]]],
                    offset: int) -> RecordIn:
    """A pool record read from nowhere in particular (no placement check), from its entity's partition, from
    another partition (misplaced), or re-partitioned (read from its home, produced to another partition: its
    writer's Lamport mark is kept per source partition)."""
    key, value, headers = raw
    home = partition_for(key, 4) if key is not None else 0
    how = rng.randrange(4)
    if how == 0:
        return RecordIn(key, value, headers, "in", 0, offset, AT)
    if how == 1:
        return RecordIn(key, value, headers, "in", home, offset, AT, 4)
    if how == 2:
        return RecordIn(key, value, headers, "in", (home + 1) % 4, offset, AT, 4)
    return RecordIn(key, value, headers, "in", rng.randrange(2), offset, AT, 4, home)


@pytest.mark.parametrize("seed", range(60))
def test_process_batch_equals_process_with_writes_applied_in_between(config: GuardConfig, seed: int) -> None:
    """Guard.process_batch (passes over the batch, an overlay of the batch's own writes) against Guard.process record
    by record, each result's writes applied to the state before the next record: the same routed records (outcome,
    reasons, both header lists, envelope), the same writes in the same order and held_delta, batch after batch.
    Records repeat (duplicates, one entity's versions and one writer's Lamport times in one batch, out of order:
    version gaps, regressions), with bad MACs, decode failures, misplaced and re-partitioned records."""
    rng = random.Random(seed)
    guard = Guard(config)
    route = config.routes[0]
    expected, state = memory_state(("entities", "lamports")), memory_state(("entities", "lamports"))
    records = [_placed_somehow(rng, POOL[rng.randrange(len(POOL))], offset) for offset in range(rng.randrange(1, 90))]
    outcomes = set()
    start = 0
    while start < len(records):
        batch = records[start:start + rng.choice((1, 2, 5, 16, 64))]
        start += len(batch)
        want = []
        for record in batch:
            want.append(guard.process(record, route, expected, now=NOW))
            _apply(want[-1], expected)
        got = guard.process_batch(batch, route, state, NOW)
        for result in got:
            _apply(result, state)
        assert [routed_view(g) for g in got] == [routed_view(w) for w in want]
        assert [list(g.writes.items()) for g in got] == [list(w.writes.items()) for w in want]
        assert [(g.held_delta, g.oldest_held_age) for g in got] == [(w.held_delta, w.oldest_held_age) for w in want]
        assert tables_of(state) == tables_of(expected)
        outcomes |= {r.decision.outcome for w in want for r in w.routed}
    if len(records) > 40:
        assert {Outcome.VERIFIED, Outcome.QUARANTINED} <= outcomes
