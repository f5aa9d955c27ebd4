"""Crash accounting: SIGKILL the worker again and again mid-stream; every input record still ends in exactly
one place, with the right verdict (processing_guarantee exactly_once, read_committed readers)."""

from __future__ import annotations

import asyncio
import os
import random
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import pytest
from aiokafka import AIOKafkaProducer

from byzguard.stamp import Stamped
from tests.integration.worker_harness import (
    Events,
    WorkerFactory,
    WorkerProcess,
    by_id,
    collect,
    wait_caught_up,
    wipe,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ENTITIES = 200
ROUNDS = 20  # versions per entity
PARTITIONS = 4
KILLS = 4
WIPE_ON_KILL = {2, 4}  # restarts after these kills start from an empty data dir
PRODUCE_SECONDS = 55.0  # the stream is spread over this long, so kills land while it flows
EXPECTED_CODE = {"regression": "version.regression", "corrupted": "integrity.mismatch"}


@dataclass
class Stream:
    """The labeled input: records in send order, and what each distinct event id must become."""

    records: list[Stamped] = field(default_factory=list)
    kind_of: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0


def labeled_stream(rng: random.Random, events: Events) -> Stream:
    """Mostly clean order versions 1..ROUNDS per entity, with regressions, corruptions and exact re-sends mixed in."""
    stream = Stream()
    subjects = [f"e{i:03d}" for i in range(ENTITIES)]
    recent: dict[str, list[Stamped]] = {s: [] for s in subjects}

    def add(record: Stamped, kind: str) -> None:
        stream.records.append(record)
        stream.kind_of[record.event_id] = kind

    for version in range(1, ROUNDS + 1):
        rng.shuffle(subjects)
        for subject in subjects:
            clean = events.clean(subject, version)
            add(clean, "clean")
            recent[subject] = [*recent[subject][-2:], clean]
            roll = rng.random()
            if roll < 0.03:  # the same record again (a producer retry): counted, never forwarded twice
                stream.records.append(rng.choice(recent[subject]))
                stream.duplicates += 1
            elif roll < 0.05 and version >= 3:
                add(events.regression(subject, version - rng.randint(1, 2)), "regression")
            elif roll < 0.07:  # next version, bytes damaged after stamping: the real next version still follows
                add(events.corrupted(subject, version + 1), "corrupted")
    return stream


def payments(events: Events, prefix: str) -> Stream:
    """A few clean payments of their own entities. Another source than the orders, so their Lamport clock is
    their own: sent whenever, they never make an order look older than its source's last event."""
    stream = Stream()
    for version in range(1, 4):
        for i in range(10):
            record = events.payment(f"{prefix}{i:02d}", version)
            stream.records.append(record)
            stream.kind_of[record.event_id] = "clean"
    return stream


def merged(streams: list[Stream]) -> Stream:
    """One labeled stream of several sent separately (their entities are disjoint)."""
    whole = Stream()
    for part in streams:
        whole.records += part.records
        whole.kind_of |= part.kind_of
        whole.duplicates += part.duplicates
    return whole


async def produce_paced(bootstrap: str, topic: str, records: list[Stamped], seconds: float, *,
                        crc32: bool = False) -> None:
    """Send the stream at an even pace over `seconds` (keyed by entity, idempotent, acks=all); `crc32`: to the
    partition librdkafka's default partitioner gives the key, not Kafka's murmur2 one."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        started = time.monotonic()
        chunk = 20
        pending = []
        for i in range(0, len(records), chunk):
            for record in records[i:i + chunk]:
                partition = zlib.crc32(record.key) % PARTITIONS if crc32 else None
                pending.append(await producer.send(topic, record.value, key=record.key, headers=record.headers,
                                                   partition=partition))
            lag = started + seconds * (i + chunk) / len(records) - time.monotonic()
            if lag > 0:
                await asyncio.sleep(lag)
        await asyncio.gather(*pending)  # raises if the broker refused any record
    finally:
        await producer.stop()


async def first_record_after(worker: WorkerProcess, since: float, timeout: float = 90.0) -> float:
    """Seconds from `since` (monotonic) until `worker` has routed its first record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(worker.events_processed) > 0:
            return time.monotonic() - since
        if not worker.alive():
            raise worker.fail("exited before it routed a record")
        await asyncio.sleep(0.1)
    raise worker.fail(f"routed nothing within {timeout:.0f} s of the kill")


@pytest.mark.parametrize("partitioning", [None, "repartition"])
async def test_sigkilled_worker_loses_and_duplicates_nothing(
    worker_factory: WorkerFactory, capsys: pytest.CaptureFixture[str], partitioning: str | None,
) -> None:
    """A worker SIGKILLed four times mid-stream and restarted (twice on a wiped data dir) still routes every input
    event exactly once: each clean id once in verified, each bad id once in quarantine with its code, duplicates
    nowhere, and nothing lost. With `partitioning: repartition` the stream is placed by CRC32 (librdkafka's default)
    and goes through the repartition topic first: the same verdicts, exactly once, over both hops."""
    seed = int(os.environ.get("BYZGUARD_CHAOS_SEED", "0")) or random.randrange(1, 1_000_000)
    rng = random.Random(seed)
    route = worker_factory.configure(partitions=PARTITIONS, partitioning=partitioning)
    crc32 = partitioning == "repartition"
    waited = [route.input]
    if crc32:
        waited.append(f"{worker_factory.app_id}-orders-entities-repartition")
    bootstrap = worker_factory.bootstrap
    events = Events()
    body = labeled_stream(rng, events)
    # Each restart gets fresh traffic of its own entities, sent right after the kill: a restart must route
    # something even when a slow machine let the paced body run dry before the last kills.
    after_kill = [payments(events, f"k{kill}-") for kill in range(1, KILLS + 1)]
    stream = merged([body, *after_kill])
    data_dir = worker_factory.base_dir / "worker-data"

    worker = worker_factory.start("run-0", data_dir=data_dir)
    started = time.monotonic()
    feeding = asyncio.create_task(produce_paced(bootstrap, route.input, body.records, PRODUCE_SECONDS, crc32=crc32))
    recoveries: list[tuple[int, bool, float, float]] = []
    try:
        await first_record_after(worker, time.monotonic())
        for kill in range(1, KILLS + 1):
            # Kill at a random moment while the worker is busy (also while it works off the backlog the last
            # kill left), never before it routed anything.
            await asyncio.sleep(rng.uniform(1.5, 5.0))
            assert worker.alive(), worker.fail("died on its own").args[0]
            killed_at = time.monotonic()
            worker.kill()
            wiped = kill in WIPE_ON_KILL
            if wiped:
                wipe(data_dir)
            await produce_paced(bootstrap, route.input, after_kill[kill - 1].records, 0.0, crc32=crc32)
            worker = worker_factory.start(f"run-{kill}", data_dir=data_dir, ready=False)
            recovery = await first_record_after(worker, killed_at)
            ready = await asyncio.to_thread(worker.wait_ready, 5.0)
            recoveries.append((kill, wiped, recovery, ready))
        await feeding
        await wait_caught_up(bootstrap, worker_factory.app_id, waited, timeout=120, workers=[worker])
    finally:
        feeding.cancel()
    processing_seconds = time.monotonic() - started

    # The ground truth is what the input topic holds: exactly the stream, each record once, in order per entity.
    inputs = await collect(bootstrap, route.input, expected=len(stream.records), idle=1.0,
                           isolation_level="read_uncommitted")
    assert Counter(r.event_id for r in inputs) == Counter(r.event_id for r in stream.records)

    clean_ids = {i for i, kind in stream.kind_of.items() if kind == "clean"}
    bad_ids = set(stream.kind_of) - clean_ids
    verified = await collect(bootstrap, route.verified, expected=len(clean_ids), idle=3.0, timeout=60)
    quarantined = await collect(bootstrap, route.quarantine, expected=len(bad_ids), idle=3.0, timeout=60)
    worker.stop()

    with capsys.disabled():
        print(f"\nchaos seed {seed}: {len(stream.records)} records ({len(clean_ids)} clean, {len(bad_ids)} bad, "
              f"{stream.duplicates} re-sent) on {PARTITIONS} partitions, {KILLS} SIGKILLs, "
              f"{processing_seconds:.1f} s until caught up")
        for kill, wiped, recovery, ready in recoveries:
            print(f"  kill {kill}: next record routed {recovery:.1f} s after SIGKILL "
                  f"(restart on {'a wiped' if wiped else 'the same'} data dir; ready {ready:.1f} s after start)")

    in_verified, in_quarantine = by_id(verified), by_id(quarantined)
    problems: dict[str, list[str]] = {}
    for event_id, kind in sorted(stream.kind_of.items()):
        v, q = len(in_verified.get(event_id, [])), len(in_quarantine.get(event_id, []))
        expected = (1, 0) if kind == "clean" else (0, 1)
        if (v, q) != expected:
            problem = f"{kind} {v}x verified {q}x quarantined"
            problems.setdefault(problem, []).append(event_id)
        elif kind != "clean" and EXPECTED_CODE[kind] not in in_quarantine[event_id][0].codes:
            problem = f"{kind} quarantined for {sorted(in_quarantine[event_id][0].codes)}"
            problems.setdefault(problem, []).append(event_id)
    strangers = sorted((set(in_verified) | set(in_quarantine)) - set(stream.kind_of))
    if strangers:
        problems["in the outputs but never produced"] = strangers
    where = {r.event_id: f"{r.event_id}@p{r.partition}:{r.offset}" for r in inputs}
    summary = "\n  ".join(f"{what}: {len(ids)} (e.g. {', '.join(where[i] for i in ids[:4])})"
                          for what, ids in problems.items())
    assert not problems, f"seed {seed}: events misrouted, by what happened to them:\n  {summary}"
    assert len(verified) + len(quarantined) == len(stream.records) - stream.duplicates
