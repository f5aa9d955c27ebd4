"""Records outside their entity's partition, on the real broker: refused by default, re-partitioned on request.

A librdkafka producer (confluent-kafka, default partitioner `consistent_random`: CRC32 of the key) puts a
keyed record where Kafka's murmur2 does not, so the worker would judge it against a partition that holds no
state for its entity; null-key records land anywhere. Both must never pass silently.
"""

from __future__ import annotations

import asyncio
import urllib.request
import zlib

import pytest
from aiokafka import AIOKafkaProducer

from byzguard.partitioner import partition_for
from byzguard.stamp import Stamped
from tests.integration.worker_harness import Events, Out, WorkerFactory, by_id, collect, produce, wait_caught_up

pytestmark = pytest.mark.kafka

PARTITIONS = 4


def metrics_text(port: int) -> str:
    """A worker's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def crc32_partition(key: bytes) -> int:
    """Where librdkafka's default partitioner (consistent_random) puts a keyed record."""
    return zlib.crc32(key) % PARTITIONS


def murmur2_partition(key: bytes) -> int:
    """Where Kafka's default partitioner (Java, aiokafka) puts a keyed record."""
    return partition_for(key, PARTITIONS)


def split_subjects(count: int) -> tuple[list[str], list[str]]:
    """`count` subjects the two partitioners place apart, and `count` they place alike."""
    apart: list[str] = []
    alike: list[str] = []
    i = 0
    while len(apart) < count or len(alike) < count:
        subject = f"pay-{i}"
        i += 1
        key = subject.encode()
        group = apart if crc32_partition(key) != murmur2_partition(key) else alike
        if len(group) < count:
            group.append(subject)
    return apart, alike


def produce_with_librdkafka(bootstrap: str, topic: str, records: list[Stamped]) -> dict[str, int]:
    """Send keyed records with confluent-kafka's default partitioner; return the partition of each event id."""
    import confluent_kafka  # the test extra's: missing, the test fails
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    placed: dict[str, int] = {}
    errors: list[str] = []

    def delivered(err: object, msg: object, event_id: str) -> None:
        if err is not None:
            errors.append(f"{event_id}: {err}")
        else:
            placed[event_id] = msg.partition()  # type: ignore[attr-defined]

    for record in records:
        producer.produce(topic, value=record.value, key=record.key, headers=record.headers,
                         on_delivery=lambda err, msg, event_id=record.event_id: delivered(err, msg, event_id))
    assert producer.flush(30) == 0, "librdkafka did not deliver everything"
    assert not errors, errors
    return placed


async def produce_at(bootstrap: str, topic: str, records: list[tuple[Stamped, int]], *, key: bytes | None) -> None:
    """Send records to explicit partitions with the given record key (None: no key)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for record, partition in records:
            await producer.send_and_wait(topic, record.value, key=key, headers=record.headers, partition=partition)
    finally:
        await producer.stop()


async def run_traffic(factory: WorkerFactory, *, partitioning: str | None) -> tuple[dict[str, list[Out]],
                                                                                  dict[str, list[Out]],
                                                                                  dict[str, Stamped], dict[str, int]]:
    """Versions 1-3 of signed payments placed by murmur2, then stale, new and null-key ones placed otherwise.

    Returns the verified and quarantined outputs by event id, the events sent by role, and where librdkafka put
    the records it sent.
    """
    route = factory.configure(partitions=PARTITIONS, partitioning=partitioning)
    worker = factory.start("w1")
    events = Events()
    apart, alike = split_subjects(3)
    subjects = apart + alike
    bootstrap = factory.bootstrap
    waited = [route.input]
    if partitioning == "repartition":
        waited.append(f"{factory.app_id}-orders-entities-repartition")

    history = [events.payment(s, v) for v in (1, 2, 3) for s in subjects]
    await produce(bootstrap, route.input, history)  # murmur2: each entity's state is where it belongs
    await wait_caught_up(bootstrap, factory.app_id, waited, workers=[worker])

    sent: dict[str, Stamped] = {}
    for s in apart:
        sent[f"stale-apart-{s}"] = events.payment(s, 2)   # older version, placed by CRC32 elsewhere
        sent[f"new-apart-{s}"] = events.payment(s, 4)     # next version, placed by CRC32 elsewhere
    for s in alike:
        sent[f"stale-alike-{s}"] = events.payment(s, 2)   # older version, CRC32 happens to agree
    placed = await asyncio.to_thread(produce_with_librdkafka, bootstrap, route.input, list(sent.values()))
    null_key: list[tuple[Stamped, int]] = []
    for partition in range(PARTITIONS):  # a stale version of one entity with no key, to every partition
        stamped = events.payment(apart[0], 1)
        sent[f"nullkey-{partition}"] = stamped
        null_key.append((stamped, partition))
    await produce_at(bootstrap, route.input, null_key, key=None)
    await wait_caught_up(bootstrap, factory.app_id, waited, workers=[worker])

    total = len(history) + len(sent)
    passed = len(history) + (len(apart) if partitioning == "repartition" else 0)  # the new versions, placed right
    verified = by_id(await collect(bootstrap, route.verified, expected=passed))
    quarantined = by_id(await collect(bootstrap, route.quarantine, expected=total - passed))
    ids = {s.event_id for s in [*history, *sent.values()]}
    assert set(verified) | set(quarantined) == ids, "a record reached no output"
    assert not set(verified) & set(quarantined), "a record reached both outputs"
    assert all(len(v) == 1 for v in [*verified.values(), *quarantined.values()]), "a record came out twice"
    assert {s.event_id for s in history} <= set(verified)
    for s in apart:  # the test placed what it meant to place
        assert placed[sent[f"stale-apart-{s}"].event_id] == crc32_partition(s.encode()) != murmur2_partition(s.encode())
    return verified, quarantined, sent, placed


async def test_records_placed_by_another_partitioner_are_refused_never_verified(
        worker_factory: WorkerFactory) -> None:
    """Stale and new versions a CRC32 producer put outside their entity's partition are decode.wrong_partition, null-key
    signed events are decode.key_mismatch on every partition, and each record ends in exactly one output."""
    verified, quarantined, sent, placed = await run_traffic(worker_factory, partitioning=None)
    route = worker_factory.route
    assert route is not None
    for role, stamped in sent.items():
        out = quarantined.get(stamped.event_id)
        assert out is not None, f"{role} was verified: {verified[stamped.event_id][0].headers}"
        codes = out[0].codes
        if role.startswith("nullkey"):
            assert codes == {"decode.key_mismatch"}, (role, out[0].reasons)
        elif role.startswith("stale-alike"):
            assert codes == {"version.regression"}, (role, out[0].reasons)
        else:
            assert codes == {"decode.wrong_partition"}, (role, out[0].reasons)
            assert "partitioner=murmur2_random" in out[0].reasons[0]["detail"]
            assert out[0].header("byzguard_original_partition") == str(placed[stamped.event_id]).encode()
    nullkey_partitions = {out[0].partition for role, s in sent.items() if role.startswith("nullkey")
                          for out in [quarantined[s.event_id]]}
    assert nullkey_partitions == set(range(PARTITIONS))


async def test_repartitioning_route_judges_misplaced_records_as_if_placed_right(worker_factory: WorkerFactory) -> None:
    """With `partitioning: repartition`, a CRC32-placed stale version is caught as version.regression and the next
    version verified, as if murmur2 had placed them; quarantine names the original topic, partition and offset;
    outputs sit in the entity's partition; null keys are still decode.key_mismatch; each record ends in one output;
    the worker reports the repartition topic's consumer lag."""
    verified, quarantined, sent, placed = await run_traffic(worker_factory, partitioning="repartition")
    route = worker_factory.route
    assert route is not None
    internal = f"{worker_factory.app_id}-orders-entities-repartition"
    lag_of = f'byzguard_consumer_lag_messages{{partition="0",topic="{internal}"}}'
    for _ in range(40):  # measured every few seconds
        if lag_of in await asyncio.to_thread(metrics_text, worker_factory.workers[0].web_port):
            break
        await asyncio.sleep(0.5)
    else:
        raise AssertionError(f"no {lag_of} in the worker's metrics")
    inputs = by_id(await collect(worker_factory.bootstrap, route.input, isolation_level="read_uncommitted"))
    for role, stamped in sent.items():
        event_id = stamped.event_id
        if role.startswith("new-apart"):
            assert event_id in verified, f"{role}: {quarantined[event_id][0].reasons}"
            out = verified[event_id][0]
            assert out.header("byzguard_verdict") == b"pass" and not out.reasons
            assert out.header("byzguard_repartitioned_from") is None
            assert out.partition == murmur2_partition(stamped.key) != placed[event_id]
            assert (out.key, out.value) == (stamped.key, stamped.value)
            continue
        out = quarantined[event_id][0]
        expected = "decode.key_mismatch" if role.startswith("nullkey") else "version.regression"
        assert out.codes == {expected}, (role, out.reasons)
        original = inputs[event_id][0]
        assert out.header("byzguard_original_topic") == route.input.encode()
        assert out.header("byzguard_original_partition") == str(original.partition).encode()
        assert out.header("byzguard_original_offset") == str(original.offset).encode()
        assert out.header("byzguard_quarantine_id") == f"{route.input}-{original.partition}-{original.offset}".encode()
        assert (out.key, out.value) == (original.key, original.value)
        assert [h for h in out.headers if not h[0].startswith("byzguard_")] == original.headers
