"""Hostile input: one worker takes tens of thousands of records of every kind a careless or hostile producer sends
(valid signed events, garbage bytes, records at the broker's size limit, 600 KB valid events, 100 KB ids, null and
wrong keys, compressed records too large to copy, exact re-sends, and the ways around the checks: types the route
does not list, records another partitioner placed, JSON that repeats a key, an attribute header given twice, signed
records replayed under another subject or version) and never stops; every input record ends in exactly
one place with its bytes: the verified topic, the quarantine topic (whole, or as a stub that points at it), or
counted as a duplicate; input = verified + quarantined + duplicates."""

from __future__ import annotations

import hashlib
import os
import random
import time
import urllib.request
from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from byzguard.partitioner import partition_for
from byzguard.stamp import Stamped
from tests.integration.worker_harness import (
    TEST_ID,
    Events,
    WorkerFactory,
    WorkerProcess,
    collect,
    wait_caught_up,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

RECORDS = int(os.environ.get("BYZGUARD_HOSTILE_RECORDS", "20000"))  # 20,000: about 60 s each on 2 cores
PARTITIONS = 4
NEAR_LIMIT = 1_048_400

Record = tuple[bytes | None, bytes, list[tuple[str, bytes]], bool]  # key, value, headers, compressed
#: Records sent to a partition other than their key's (as librdkafka's default CRC32 partitioner would), by index.
Placement = dict[int, int]


def _fingerprint(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> bytes:
    digest = hashlib.sha256()
    for part in (key, value):
        digest.update(b"-" if part is None else b"+%d:" % len(part) + part)
    for name, raw in headers:
        if not name.startswith("byzguard_"):
            digest.update(b"h%d:%s=%d:" % (len(name), name.encode(), len(raw)) + raw)
    return digest.digest()


def _replaced(headers: list[tuple[str, bytes]], name: str, raw: bytes) -> list[tuple[str, bytes]]:
    return [(k, raw if k == name else v) for k, v in headers]


def hostile_stream(rng: random.Random, events: Events, total: int) -> tuple[list[Record], Placement, set[int]]:
    """`total` records: mostly clean signed orders (versions rising per entity), mixed with every hostile kind;
    the records to send to a partition of the test's choosing (their key's is another), and the indices of the
    records that are a way around a check (none of them may be verified)."""
    out: list[Record] = []
    placed: Placement = {}
    around: set[int] = set()
    sent_clean: list[Stamped] = []
    version: Counter[str] = Counter()
    entities = [f"e{i:04d}" for i in range(max(50, total // 20))]

    def stamped(s: Stamped, *, key: bytes | str | None = "same", compressed: bool = False) -> None:
        k = s.key if key == "same" else key
        out.append((k if not isinstance(k, str) else k.encode(), s.value, list(s.headers), compressed))

    def clean(subject: str) -> Stamped:
        version[subject] += 1
        return events.clean(subject, version[subject])

    # The big ones, a few of each, spread over the stream.
    for n in range(3):
        junk = rng.randbytes(NEAR_LIMIT)
        out.append((f"junk-{n}".encode(), junk, [(TEST_ID, f"near-limit-{n}".encode())], False))
    for n in range(3):
        subject = f"big-{n}"
        version[subject] += 1
        data = {"order": subject, "version": 1, "notes": "\u00e9" * 300_000}  # its state takes over 1 MB
        s = events.orders.binary(data, type="order.confirmed", subject=subject, version=1, time=time.time(),
                                 event_id=f"big-600k-{n}")
        stamped(s)
    for n in range(2):
        s = events.orders.binary(b'{"pad": "' + b"z" * 3_000_000 + b'"}', type="order.confirmed",
                                 subject=f"zip-{n}", version=1, time=time.time(), event_id=f"zip-{n}")
        stamped(s, compressed=True)
    for n in range(20):
        subject = f"longid-{n}"
        s = clean(subject)
        event_id = f"{n:02d}" + "i" * 100_000
        stamped(Stamped(s.key, s.value, [(k, event_id.encode() if k == "ce_id" else v) for k, v in s.headers],
                        event_id))
    while len(out) < total:
        roll = rng.random()
        if roll < 0.70 or not sent_clean:
            s = clean(rng.choice(entities))
            sent_clean.append(s)
            stamped(s)
        elif roll < 0.78:
            out.append((rng.choice([None, rng.randbytes(rng.randint(0, 40))]), rng.randbytes(rng.randint(0, 3000)),
                        [(TEST_ID, f"garbage-{len(out)}".encode())], False))
        elif roll < 0.81:
            stamped(clean(rng.choice(entities)), key=None)  # null key
        elif roll < 0.84:
            stamped(clean(rng.choice(entities)), key=rng.choice(entities))  # another entity's key
        elif roll < 0.87:
            stamped(events.corrupted(rng.choice(entities), 1))
        elif roll < 0.90:
            subject = rng.choice(entities)
            if version[subject] > 2:
                stamped(events.regression(subject, version[subject] - 1))
        elif roll < 0.92:
            stamped(rng.choice(sent_clean[-200:]))  # an exact re-send (a producer's retry)
        elif roll < 0.93:  # a type the route does not list, from a known source with a valid checksum
            subject = rng.choice(entities)
            around.add(len(out))
            stamped(events.orders.binary({"order": subject}, type="order.confirmedd", subject=subject,
                                         version=version[subject] + 1, time=time.time()))
        elif roll < 0.95:  # placed by another partitioner: a stale version where its entity's state is not
            subject = rng.choice(entities)
            s = events.regression(subject, max(1, version[subject] - 1)) if version[subject] > 1 else clean(subject)
            placed[len(out)] = -1  # the partition is chosen at send time: any but the key's
            around.add(len(out))
            stamped(s)
        elif roll < 0.96:  # JSON that repeats a key (the first value and the last disagree)
            subject = rng.choice(entities)
            s = events.orders.binary({"order": subject}, type="order.confirmed", subject=subject,
                                     version=version[subject] + 1, time=time.time())
            around.add(len(out))
            stamped(Stamped(s.key, b'{"amount": -1, "amount": 5}', s.headers, s.event_id))
        elif roll < 0.97:  # an attribute header given twice, with two values
            subject = rng.choice(entities)
            s = clean(subject)
            other = rng.choice([e for e in entities[:20] if e != subject])
            around.add(len(out))
            stamped(Stamped(s.key, s.value, [*s.headers, ("ce_subject", other.encode())], s.event_id))
        elif roll < 0.985:  # a captured signed record replayed as another entity
            s = rng.choice(sent_clean[-200:])
            other = rng.choice([e for e in entities[:20] if e.encode() != s.key])
            around.add(len(out))
            stamped(Stamped(other.encode(), s.value, _replaced(list(s.headers), "ce_subject", other.encode()),
                            s.event_id))
        else:  # a captured signed record replayed as a newer version
            s = rng.choice(sent_clean[-200:])
            around.add(len(out))
            stamped(Stamped(s.key, s.value, _replaced(list(s.headers), "ce_entityversion", b"999999"),
                            s.event_id))
    # Big ones mixed in at random places; the order of each entity's own events is kept.
    head, tail = out[:28], out[28:]
    moved = {id(out[i]) for i in placed}
    refused = {id(out[i]) for i in around}
    for record in head:
        tail.insert(rng.randrange(len(tail) + 1), record)
    return (tail, {i: -1 for i, record in enumerate(tail) if id(record) in moved},
            {i for i, record in enumerate(tail) if id(record) in refused})


async def _send(bootstrap: str, topic: str, records: list[Record], placed: Placement) -> list[tuple[int, int]]:
    """Send in order (the records in `placed` to a partition their key does not map to); returns each record's
    (partition, offset)."""
    plain = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                             max_request_size=16 << 20)
    zipped = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                              compression_type="gzip", max_request_size=16 << 20)
    await plain.start()
    await zipped.start()
    try:
        futures = []
        for n, (key, value, headers, compressed) in enumerate(records):
            producer = zipped if compressed else plain
            partition = None
            if n in placed and key is not None:
                partition = (partition_for(key, PARTITIONS) + 1 + n % (PARTITIONS - 1)) % PARTITIONS
            futures.append(await producer.send(topic, value, key=key, headers=headers, partition=partition))
        coords = []
        for fut in futures:
            meta = await fut
            coords.append((meta.partition, meta.offset))
        return coords
    finally:
        await plain.stop()
        await zipped.stop()


def _duplicates_counted(worker: WorkerProcess) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "byzguard_events_total" and sample.labels.get("outcome") == "duplicate")


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_every_hostile_record_ends_in_exactly_one_place_and_the_worker_never_stops(
        worker_factory: WorkerFactory, guarantee: str) -> None:
    """RECORDS hostile and valid records: the worker runs throughout, every record is verified, quarantined (whole
    or as a stub pointing at it) or counted as a duplicate, once, with its bytes."""
    worker_factory.processing_guarantee = guarantee
    route = worker_factory.configure(partitions=PARTITIONS)
    worker = worker_factory.start("w1")
    rng = random.Random(20261206)
    records, placed, around = hostile_stream(rng, Events(), RECORDS)
    started = time.monotonic()
    coords = await _send(worker_factory.bootstrap, route.input, records, placed)
    await wait_caught_up(worker_factory.bootstrap, worker_factory.app_id, [route.input], workers=[worker],
                         timeout=600)
    elapsed = time.monotonic() - started
    assert worker.alive(), worker.fail("stopped")
    log = worker.log_text()
    assert log.count("===== w1 starting at") == 1 and "Crashed" not in log, worker.fail("crashed or restarted")

    verified = await collect(worker_factory.bootstrap, route.verified, expected=1, idle=3.0, timeout=300)
    quarantined = await collect(worker_factory.bootstrap, route.quarantine, expected=1, idle=3.0, timeout=300)
    duplicates = _duplicates_counted(worker)
    by_coords = {c: r for c, r in zip(coords, records, strict=True)}
    inputs = Counter(_fingerprint(k, v, h) for k, v, h, _ in records)

    # Quarantine: each input coordinate at most once, with the input's bytes (or a stub with the value's SHA-256).
    seen: Counter[tuple[int, int]] = Counter()
    stubs = 0
    left = Counter(inputs)
    for out in quarantined:
        at = (int(out.header("byzguard_original_partition") or -1), int(out.header("byzguard_original_offset") or -1))
        assert at in by_coords, f"a quarantined record points at no input: {at}"
        seen[at] += 1
        key, value, headers, _ = by_coords[at]
        if out.header("byzguard_stub") is not None:
            stubs += 1
            body = orjson.loads(out.value or b"")
            assert body["value_sha256"] == hashlib.sha256(value).hexdigest() and out.codes >= {"output.too_large"}
        else:
            assert (out.key, out.value, out.partition) == (key, value, at[0])
            assert [(k, v) for k, v in out.headers if not k.startswith("byzguard_")] == headers
        left[_fingerprint(key, value, headers)] -= 1
    twice = [at for at, n in seen.items() if n > 1]
    assert not twice, f"quarantined more than once: {twice[:5]}"

    # Verified: byte for byte an input record that was not quarantined, at most once per distinct record.
    forwarded = Counter(_fingerprint(o.key, o.value, o.headers) for o in verified)
    unknown = [fp for fp in forwarded if fp not in inputs]
    assert not unknown, f"{len(unknown)} verified records are no input's bytes"
    more = {fp: n for fp, n in forwarded.items() if n > 1}
    assert not more, f"{len(more)} records verified more than once"
    for fp, n in forwarded.items():
        assert left[fp] >= n, "verified and quarantined"
    # What is neither verified nor quarantined was counted as a duplicate, and that is all the duplicates.
    remaining = sum((left - forwarded).values())
    assert remaining == duplicates, f"{remaining} records in no output, {duplicates:.0f} counted as duplicates"
    assert len(records) == len(verified) + len(quarantined) + duplicates
    assert stubs == 2, "the two compressed 3 MB records are stubs"
    # No way around a check got through: each such record is quarantined, none verified.
    walked_around = [n for n in around if _fingerprint(*records[n][:3]) in forwarded]
    assert not walked_around, f"{len(walked_around)} records that go around a check were verified"
    assert all(coords[n] in seen for n in around), "a record that goes around a check is not in quarantine"
    assert len(around) > RECORDS // 20
    print(f"\n{guarantee}: {len(records)} records in {elapsed:.1f} s: {len(verified)} verified, "
          f"{len(quarantined)} quarantined ({stubs} stubs), {duplicates:.0f} duplicates")
