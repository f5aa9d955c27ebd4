"""Reading Kafka beside the worker: consumers outside any group that see only committed records, and topic
partitions known even for a topic created a moment ago.

Every worker-side tool that looks at topics without being part of the guard's consumer group (the review store,
the backlog gauge, the CLI's quarantine, audit and contract commands, the demo's scoreboard; the test harness's reader)
builds its consumer here, so they share one definition of "a side reader": no group id (no group is joined, no
offset committed, the guard's group never disturbed), no auto commit, `read_committed` (records of aborted or open
transactions are never seen), from the earliest offset; and they look up the partitions of the topics they read
with `topic_partitions`. The client (byzguard/client/), which may be installed
without the worker, keeps its own receipt reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.client import AIOKafkaClient
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


async def topic_partitions(consumer: AIOKafkaConsumer, topics: Iterable[str], *,
                           patience: float = 0.0) -> list[TopicPartition]:
    """The partitions of those of `topics` that exist, in order (a missing topic has none, and is not created by
    the look), asked with `known_partitions`. A topic created a moment ago may not be known to the broker asked
    yet: it is asked again for up to `patience` seconds until every topic has partitions."""
    wanted = list(dict.fromkeys(topics))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        found = {name: parts for name, parts in (await known_partitions(consumer._client, wanted)).items() if parts}
        if len(found) == len(wanted) or loop.time() >= deadline:
            return [TopicPartition(topic, p) for topic in wanted for p in found.get(topic, ())]
        await asyncio.sleep(0.2)


async def known_partitions(client: AIOKafkaClient, topics: Iterable[str]) -> dict[str, list[int]]:
    """The partition numbers of each of `topics` the broker knows (a missing one is left out, and is not created
    by the look: the request says allow_auto_topic_creation false, where aiokafka's own metadata requests let a
    broker with auto.create.topics.enable create what they name), asked for these topics alone: the whole
    cluster's metadata, which aiokafka's refresh and `list_topics` fetch, takes a third of a second to fetch and
    decode on a broker of 1,900 topics. `client` is a started consumer's or admin client's (`_client`).

    aiokafka has no public call for it; this is the one place byzguard reaches into its client for it."""
    wanted = list(dict.fromkeys(topics))
    if not wanted:
        return {}  # an empty MetadataRequest of version 0 asks for every topic
    response = await client.send(client.get_random_node(), MetadataRequest(wanted, allow_auto_topic_creation=False))
    return {name: sorted(p[1] for p in partitions)
            for error_code, name, *_, partitions in response.topics if error_code == 0}
