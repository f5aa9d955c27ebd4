"""A worker's producers refresh the metadata of the topics they use, never the whole cluster's: faust's producer
(app/faust_producer.py) and the batched runtime's transactional producers (app/runtime/stages.py)."""

from __future__ import annotations

from pathlib import Path

import faust
import pytest
from aiokafka import AIOKafkaProducer

from app.faust_producer import scope_producer_metadata
from app.runtime.stages import refreshing_only
from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("scoped", [True, False])
async def test_declaring_a_topic_refreshes_the_known_topics_only(kafka_bootstrap: str, topic_factory: TopicFactory,
                                                                  tmp_path: Path, scoped: bool) -> None:
    """After faust's producer declares a topic (as it does its leader topic at start), its client holds the
    metadata of the topics it was told, not of another topic of the cluster; unscoped, it holds every topic's."""
    known, other, declared = topic_factory(), topic_factory(), topic_factory()
    app = faust.App(f"scoped-{tmp_path.name}", broker=f"kafka://{kafka_bootstrap}", datadir=str(tmp_path),
                    autodiscover=False, env={}, web_enabled=False, topic_allow_declare=True)
    if scoped:
        scope_producer_metadata(app, [known])
    producer = app.producer
    await producer.start()
    try:
        await producer.create_topic(declared, 1, 1)  # exists: faust skips creating it, then refreshes
        topics = producer._ensure_producer().client.cluster.topics()
        assert known in topics if scoped else {known, other, declared} <= topics
        assert (other not in topics) is scoped
    finally:
        await producer.stop()


@pytest.mark.parametrize("scoped", [True, False])
async def test_a_transactional_producer_refreshes_the_topics_it_was_given(kafka_bootstrap: str,
                                                                         topic_factory: TopicFactory,
                                                                         scoped: bool) -> None:
    """A refresh of a runtime producer that has sent nothing yet (as its start forces one after each refused
    InitProducerId) asks for the topics it was given; without them, for every topic of the cluster."""
    known, other = topic_factory(), topic_factory()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    if scoped:
        refreshing_only(producer, [known])
    await producer.start()
    try:
        await producer.client.force_metadata_update()
        topics = producer.client.cluster.topics()
        assert known in topics if scoped else {known, other} <= topics
        assert (other not in topics) is scoped
    finally:
        await producer.stop()
