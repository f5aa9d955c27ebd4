"""Start-up metadata on the real broker (auto.create.topics.enable on): provisioning and the topic limits ask about
the topics they need by name, never list every topic of the cluster, and never create a topic by asking."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from app.provision import _partition_counts, provision
from app.runtime.limits import load_limits
from byzguard.config import load
from tests.conftest import TopicFactory, broker_auto_creates_topics, run_async, unique_name
from tests.integration.worker_harness import SECRETS, WorkerFactory

pytestmark = pytest.mark.kafka

Listing = Callable[[], Awaitable[set[str]]]


async def _never_listed(listed: Listing, topic: str) -> bool:
    """`topic` does not show in the cluster's listing within 2 s (a broker creates a topic asked about a moment
    after the answer)."""
    for _ in range(10):
        if topic in await listed():
            return False
        await asyncio.sleep(0.2)
    return True


@pytest.fixture
def listed(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> Listing:
    """Forbids AIOKafkaAdminClient.list_topics to the code under test; returns the test's own listing. The broker
    must auto-create topics, or "creates none" could not fail."""
    assert run_async(lambda: broker_auto_creates_topics(kafka_bootstrap)), \
        "the broker does not auto-create topics (auto.create.topics.enable): these tests would prove nothing"
    original = AIOKafkaAdminClient.list_topics

    async def forbidden(self: AIOKafkaAdminClient, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a whole-cluster topic listing at start-up")

    monkeypatch.setattr(AIOKafkaAdminClient, "list_topics", forbidden)

    async def listing() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            return set(await original(admin))
        finally:
            await admin.close()

    return listing


async def test_load_limits_asks_for_the_named_topics_and_creates_none(
        kafka_bootstrap: str, topic_factory: TopicFactory, listed: Listing) -> None:
    """An existing topic's limit is read without listing the cluster; a missing one is left out, and not created."""
    existing = topic_factory(1, {"max.message.bytes": "123456"})
    missing = unique_name("limits-missing", kafka_bootstrap)

    assert await load_limits(kafka_bootstrap, [existing, missing], retry_for=0) == {existing: 123456}
    assert await _never_listed(listed, missing)


async def test_partition_counts_ask_for_the_named_topics_and_create_none(
        kafka_bootstrap: str, topic_factory: TopicFactory, listed: Listing) -> None:
    """Provisioning counts the partitions of the existing topics without listing the cluster; a missing topic
    has no count and is not created by the look (an auto-created one would have the broker's 1 partition)."""
    existing = topic_factory(3)
    missing = unique_name("provision-missing", kafka_bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert await _partition_counts(admin, [missing, existing]) == {existing: 3}
    finally:
        await admin.close()
    assert await _never_listed(listed, missing)


async def test_provision_creates_the_routes_topics_without_listing_the_cluster(
        worker_factory: WorkerFactory, listed: Listing) -> None:
    """A fresh route's topics are created with its partitions, and found again by a second start, all without a
    whole-cluster listing."""
    route = worker_factory.configure(partitions=2)
    assert worker_factory.config_path is not None
    config = load(worker_factory.config_path, environ=SECRETS)

    provisioned = await provision(worker_factory.bootstrap, config, worker_factory.app_id)
    again = await provision(worker_factory.bootstrap, config, worker_factory.app_id)

    assert [r.partitions for r in provisioned.routes] == [r.partitions for r in again.routes] == [2]
    assert {route.input, route.verified, route.quarantine} <= await listed()
