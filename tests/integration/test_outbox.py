"""app.outbox.Outbox on the real broker: records go out in aiokafka record batches, in order per partition, with
their keys, values and headers; a wake sends without waiting for a commit; a flush returns once everything is
delivered, with the offset of each partition's last record; a record that cannot be sent fails the flush."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import faust
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError

from app.outbox import Outbox, RecordTooLargeError
from tests.conftest import TopicFactory

PARTITIONS = 3


Read = tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes]]]  # partition, offset, key, value, headers


async def _read(bootstrap: str, topic: str, count: int, timeout: float = 20.0) -> list[Read]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        got: list[Read] = []
        async with asyncio.timeout(timeout):
            while len(got) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend((r.partition, r.offset, r.key, r.value, list(r.headers)) for r in records)
        return got
    finally:
        await consumer.stop()


@pytest.fixture
async def outbox(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[Outbox]:
    app = faust.App(f"outbox-test-{uuid.uuid4().hex[:6]}", broker=f"kafka://{kafka_bootstrap}", datadir=str(tmp_path),
                    autodiscover=False, env={}, web_enabled=False)
    box = Outbox(app)
    await box.start()
    sender = asyncio.get_running_loop().create_task(box.run())
    try:
        yield box
    finally:
        sender.cancel()
        await app.producer.stop()


async def test_records_arrive_in_order_per_partition_with_their_headers_and_flush_knows_the_last_offsets(
        outbox: Outbox, kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = topic_factory(PARTITIONS)
    value = b"x" * 400
    sent = []
    for i in range(3000):  # ~40 record batches per partition: full batches go out while records are added
        partition = i % PARTITIONS
        key = b"acct-%d" % i
        headers = [("byzguard-seq", str(i).encode())]
        outbox.add(topic, partition, key, value, headers)
        sent.append((partition, key, headers))
        if outbox.due():
            await outbox.wake()
    last = await outbox.flush()
    got = await _read(kafka_bootstrap, topic, len(sent))
    for partition in range(PARTITIONS):
        mine = [(k, h) for p, k, h in sent if p == partition]
        theirs = sorted((o, k, h) for p, o, k, _, h in got if p == partition)
        assert [(k, h) for _, k, h in theirs] == mine, f"partition {partition}: every record once, in order"
        assert last[(topic, partition)] == theirs[-1][0]
    assert all(v == value for *_, v, _ in got)
    assert not outbox.pending


async def test_a_wake_sends_without_a_commit(outbox: Outbox, kafka_bootstrap: str,
                                             topic_factory: TopicFactory) -> None:
    topic = topic_factory(PARTITIONS)
    outbox.add(topic, 1, b"acct-1", b"lone event")
    assert outbox.pending and not outbox.due(), "one record does not fill a batch and has not lingered yet"
    await outbox.wake()
    got = await _read(kafka_bootstrap, topic, 1, timeout=10.0)
    assert [(p, k, v) for p, _, k, v, _ in got] == [(1, b"acct-1", b"lone event")]


async def test_a_record_that_cannot_be_sent_stops_the_next_add_and_the_flush(
        outbox: Outbox, kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = topic_factory(PARTITIONS)
    outbox.add(topic, PARTITIONS + 5, b"acct-1", b"to a partition that does not exist")
    await outbox.wake()
    await asyncio.sleep(0.5)  # the sender task tries, and fails
    with pytest.raises(AssertionError, match="partition"):
        outbox.add(topic, 0, b"acct-2", b"next")
    with pytest.raises(AssertionError, match="partition"):
        await asyncio.wait_for(outbox.flush(), 30)


async def test_a_batch_the_broker_refuses_fails_that_flush_and_every_later_one(
        outbox: Outbox, kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    """A batch that is not delivered (the broker refuses it) is never skipped: the flush raises, and so does every
    later flush and add, so no commit passes the lost records."""
    topic = topic_factory(PARTITIONS, {"max.message.bytes": "2000"})
    outbox.limits[topic] = 10_000_000  # as if the limit had been lowered after the outbox read it
    outbox.add(topic, 0, b"acct-1", b"x" * 5000)
    with pytest.raises(MessageSizeTooLargeError):
        await asyncio.wait_for(outbox.flush(), 30)
    with pytest.raises(MessageSizeTooLargeError):
        await asyncio.wait_for(outbox.flush(), 30)
    with pytest.raises(MessageSizeTooLargeError):
        outbox.add(topic, 1, b"acct-2", b"next")


async def test_a_record_larger_than_its_topic_takes_is_refused_before_it_is_sent(
        outbox: Outbox, kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    """`start` reads each topic's max.message.bytes; `add` refuses a record that does not fit, and `fits` says so
    beforehand."""
    topic = topic_factory(PARTITIONS, {"max.message.bytes": "20000"})
    await outbox.start([topic])
    assert outbox.limit(topic) == 20000
    assert outbox.fits(topic, b"k", b"x" * 19_000) and not outbox.fits(topic, b"k", b"x" * 20_000)
    with pytest.raises(RecordTooLargeError):
        outbox.add(topic, 0, b"acct-1", b"x" * 20_000)
    outbox.add(topic, 0, b"acct-1", b"x" * 19_000)
    assert (await outbox.flush())[(topic, 0)] == 0
