"""Side readers (app/sidereads.py) on the real broker: outside any group, committed records only, and the
partitions of a topic created a moment ago."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.sidereads import side_consumer, started_side_consumer, topic_partitions
from tests.conftest import TopicFactory, broker_auto_creates_topics, unique_name

pytestmark = pytest.mark.kafka


async def _never_created(admin: AIOKafkaAdminClient, topic: str) -> bool:
    """`topic` does not show in the cluster's listing within 2 s (a broker creates a topic asked about a moment
    after its answer: a single look right after would miss it)."""
    for _ in range(10):
        if topic in await admin.list_topics():
            return False
        await asyncio.sleep(0.2)
    return True


async def test_a_side_reader_sees_committed_records_only(kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    """A record of an aborted transaction is never read; the committed one after it is."""
    topic = topic_factory(1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"side-{uuid.uuid4().hex}")
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"aborted")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed")
    finally:
        await producer.stop()
    consumer = await started_side_consumer(kafka_bootstrap)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        values = []
        while await consumer.position(tp) < end:
            values += [r.value for r in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])]
    finally:
        await consumer.stop()
    assert values == [b"committed"]


async def test_a_side_reader_joins_no_group(kafka_bootstrap: str) -> None:
    """Its group id is None, whatever else is given: it never joins or disturbs the guard's group."""
    consumer = side_consumer(kafka_bootstrap, client_id="byzguard-test")
    assert consumer._group_id is None
    assert consumer._client._client_id == "byzguard-test"
    await consumer.stop()


async def test_partitions_of_a_topic_created_a_moment_ago(kafka_bootstrap: str) -> None:
    """A topic created after the reader started is found, asked again while the broker does not know it yet; a
    missing topic has no partitions (and is not created by the look), also after the patience given."""
    consumer = await started_side_consumer(kafka_bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    name = unique_name("sidereads", kafka_bootstrap)
    try:
        assert await topic_partitions(consumer, [name]) == []
        await admin.create_topics([NewTopic(name, 3, 1)])
        assert await topic_partitions(consumer, [name], patience=10) == [TopicPartition(name, p) for p in range(3)]
        missing = unique_name("sidereads-missing", kafka_bootstrap)
        started = time.monotonic()
        assert await topic_partitions(consumer, [missing], patience=0.5) == []
        assert time.monotonic() - started >= 0.5
        assert await _never_created(admin, missing), "asking about the missing topic created it"
    finally:
        await admin.delete_topics([name])
        await admin.close()
        await consumer.stop()


async def test_topic_partitions_asks_for_the_topics_alone_and_creates_none(kafka_bootstrap: str,
                                                                           topic_factory: TopicFactory) -> None:
    """The partitions of the existing topics asked for are found in the order asked, with one request for these
    topics alone; a missing topic among them has none and is not created by the look (the broker may auto-create
    topics); no topic asked for: none, without asking for every topic."""
    assert await broker_auto_creates_topics(kafka_bootstrap), "a broker that never auto-creates proves nothing here"
    first, second = topic_factory(3), topic_factory(1)
    missing = unique_name("sidereads-missing", kafka_bootstrap)
    consumer = await started_side_consumer(kafka_bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    asked: list[Any] = []
    send = consumer._client.send

    async def counted(node_id: int, request: Any, **kw: Any) -> Any:
        response = await send(node_id, request, **kw)
        asked.append(sorted(topic[1] for topic in response.topics))
        return response

    consumer._client.send = counted  # type: ignore[method-assign]
    try:
        found = await topic_partitions(consumer, [second, missing, first])
        assert found == [TopicPartition(second, 0)] + [TopicPartition(first, p) for p in range(3)]
        assert asked == [sorted([second, missing, first])]  # one answer, about these topics alone
        assert await _never_created(admin, missing), "asking about the missing topic created it"
        assert await topic_partitions(consumer, []) == []
        assert len(asked) == 1
    finally:
        await admin.close()
        await consumer.stop()
