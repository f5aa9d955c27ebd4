"""Broker-side helpers of the benchmark: topics, pre-production, group progress and reading outputs back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

# Outputs are created with broker timestamps, so a record's timestamp is the moment the broker appended
# it (its acknowledgement), whatever the producer's clock says: throughput is measured between these.
LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}

Record = tuple[bytes | None, bytes, list[tuple[str, bytes]]]


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int,
                        config: dict[str, str] | None = None) -> None:
    """Create topics (an existing one is an error: every benchmark run uses fresh names) and wait for leaders."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(n, partitions, 1, topic_configs=dict(config or {}))
                                              for n in names], timeout_ms=30_000)
        for error in response.to_object().get("topic_errors", []):
            if error.get("error_code"):
                raise RuntimeError(f"creating topic {error.get('topic')!r} failed: {error}")
        for _ in range(400):
            described = await admin.describe_topics(list(names))
            if all(not t.get("error_code") and len(t.get("partitions", [])) == partitions
                   and all(p.get("leader", -1) >= 0 for p in t["partitions"]) for t in described):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"topics {list(names)} have no leader for every partition after 20 s")
    finally:
        await admin.close()


async def listed_topics(bootstrap: str) -> set[str]:
    """Every topic the broker lists (one whole-cluster Metadata request: for tests and the bench only)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, prefixes: Iterable[str]) -> list[str]:
    """Delete every topic whose name starts with one of `prefixes`: one listing, one delete request. A prefix
    that is a topic's whole name is deleted even when the listing has not caught up with it yet (an unknown
    topic is only an error code in the answer). Returns the listed names it deleted. The tests' topics go the same
    way (tests/conftest.py `claim_topics`)."""
    wanted = tuple(prefixes)
    if not wanted:
        return []
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        listed = sorted(t for t in await admin.list_topics() if t.startswith(wanted))
        await admin.delete_topics(sorted(set(listed) | set(wanted)), timeout_ms=10_000)
        return listed
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: Iterable[Record], *,
                  partition_of: Callable[[int], int] | None = None) -> int:
    """Send records as fast as the client allows (not timed); keyed records go by Kafka's default partitioner."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=256 * 1024, max_request_size=4 * 1024 * 1024)
    await producer.start()
    sent = 0
    try:
        pending: list[asyncio.Future[Any]] = []
        for i, (key, value, headers) in enumerate(records):
            partition = partition_of(i) if partition_of is not None else None
            pending.append(await producer.send(topic, value, key=key, headers=headers, partition=partition))
            sent += 1
            if len(pending) >= 20_000:
                await asyncio.wait_for(asyncio.gather(*pending), 600)
                pending.clear()
        # Bounded waits: a full run once hung here for good after its last batch was written (cause unknown).
        await asyncio.wait_for(asyncio.gather(*pending), 600)
    finally:
        try:
            await asyncio.wait_for(producer.stop(), 60)
        except TimeoutError:
            print(f"warning: the producer to {topic} did not stop within 60 s; going on", flush=True)
    return sent


class Progress:
    """Polls how far a consumer group got on its input and how much its outputs hold (cheap, no data read)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
        self._probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._committed_probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                                 isolation_level="read_committed")

    async def __aenter__(self) -> Progress:
        await self._admin.start()
        await self._probe.start()
        await self._committed_probe.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._committed_probe.stop()
        await self._probe.stop()
        await self._admin.close()

    async def partitions(self, topic: str) -> list[TopicPartition]:
        """The partitions of a topic (refreshing metadata until it is known)."""
        for _ in range(100):
            parts = self._probe.partitions_for_topic(topic)
            if parts:
                return [TopicPartition(topic, p) for p in sorted(parts)]
            await self._probe._client.force_metadata_update()
            await asyncio.sleep(0.1)
        raise RuntimeError(f"no metadata for topic {topic!r}")

    async def end_offsets(self, topics: Sequence[str], *, committed: bool = False) -> dict[TopicPartition, int]:
        """High watermarks (or, `committed`, last stable offsets) of every partition of `topics`; both count
        transaction markers."""
        tps = [tp for t in topics for tp in await self.partitions(t)]
        probe = self._committed_probe if committed else self._probe
        result: dict[TopicPartition, int] = await probe.end_offsets(tps)
        return result

    async def committed(self, group: str, topic: str) -> int:
        """Sum of the group's committed offsets on `topic` (0 for partitions it has not committed)."""
        try:
            offsets = await self._admin.list_consumer_group_offsets(group)
        except Exception:  # the group may not exist yet
            return 0
        return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


@dataclass
class OutputScan:
    """What a topic held, read back from the beginning."""

    count: int = 0
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None
    timestamp_types: set[int] = field(default_factory=set)
    records: list[Any] = field(default_factory=list)


async def scan(bootstrap: str, topics: Sequence[str], *, read_committed: bool = True,
               keep: Callable[[Any], Any] | None = None, timeout: float = 300.0) -> dict[str, OutputScan]:
    """Read every record of `topics` up to their current end (the last stable offset when read_committed)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed" if read_committed else "read_uncommitted",
                                max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024,
                                fetch_max_wait_ms=100)
    await consumer.start()
    out = {t: OutputScan() for t in topics}
    try:
        tps = []
        for t in topics:
            parts = consumer.partitions_for_topic(t)
            for _ in range(50):
                if parts:
                    break
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(t)
            tps.extend(TopicPartition(t, p) for p in sorted(parts or ()))
        if not tps:
            return out
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if ends[tp] > 0}
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {list(topics)} back did not finish in {timeout:.0f} s")
            batch = await consumer.getmany(timeout_ms=500, max_records=50_000)
            for tp, msgs in batch.items():
                acc = out[tp.topic]
                for m in msgs:
                    acc.count += 1
                    ts = m.timestamp
                    if acc.first_ts_ms is None or ts < acc.first_ts_ms:
                        acc.first_ts_ms = ts
                    if acc.last_ts_ms is None or ts > acc.last_ts_ms:
                        acc.last_ts_ms = ts
                    acc.timestamp_types.add(m.timestamp_type)
                    if keep is not None:
                        acc.records.append(keep(m))
            for tp in list(todo):
                if await consumer.position(tp) >= ends[tp]:
                    todo.discard(tp)
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    return out
