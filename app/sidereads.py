"""Reading Kafka beside the worker: consumers outside any group that see only committed records, and topic
partitions known even for a topic created a moment ago.

Every worker-side tool that looks at topics without being part of the guard's consumer group (the review store,
the backlog gauge, the CLI's quarantine, audit and contract commands, the demo's scoreboard; the test harness's reader)
builds its consumer here, so they share one definition of "a side reader": no group id (no group is joined, no
offset committed, the guard's group never disturbed), no auto commit, `read_committed` (records of aborted or open
transactions are never seen), from the earliest offset. The client (byzguard/client/), which may be installed
without the worker, keeps its own receipt reader.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.protocol.metadata import MetadataRequest


def side_consumer(bootstrap: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer outside any group that reads committed records only; not started. `options` are aiokafka's
    (client_id, fetch sizes, request_timeout_ms, ...) and override the defaults."""
    settings: dict[str, Any] = {"group_id": None, "enable_auto_commit": False,
                                "isolation_level": "read_committed", "auto_offset_reset": "earliest"}
    settings.update(options)
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, **settings)


async def started_side_consumer(bootstrap: str, **options: Any) -> AIOKafkaConsumer:
    """`side_consumer`, started; stopped again (its connections closed) if it cannot start."""
    consumer = side_consumer(bootstrap, **options)
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def refresh_metadata(consumer: AIOKafkaConsumer) -> None:
    """Ask the broker for the cluster's metadata now, instead of waiting for aiokafka's next refresh.

    aiokafka has no public call for it; this is the one place byzguard reaches into its client for it."""
    await consumer._client.force_metadata_update()


async def partitions_for(consumer: AIOKafkaConsumer, topic: str, *, patience: float = 0.0) -> set[int]:
    """The partition numbers of `topic` (empty when it does not exist). A topic created a moment ago may not be
    in the metadata yet: the metadata is refreshed and looked at again for up to `patience` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    partitions: set[int] = set(consumer.partitions_for_topic(topic) or ())
    while not partitions:
        await refresh_metadata(consumer)
        partitions = set(consumer.partitions_for_topic(topic) or ())
        if partitions or loop.time() >= deadline:
            break
        await asyncio.sleep(0.2)
    return partitions


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """The partitions of `topic` (none: it does not exist), asked of the broker for this topic alone, without
    creating it. Cheaper than `partitions_for`'s refresh for a reader assigned nothing, which fetches the whole
    cluster's metadata (a third of a second to fetch and decode on a broker of 1,900 topics)."""
    client = consumer._client
    response = await client.send(client.get_random_node(),
                                 MetadataRequest([topic], allow_auto_topic_creation=False))
    for error_code, name, *_, partitions in response.topics:
        if name == topic and error_code == 0:
            return sorted(p[1] for p in partitions)
    return []
