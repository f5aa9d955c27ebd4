"""faust's producer in a worker refreshes the metadata of the routes' topics, never of the whole cluster."""

from __future__ import annotations

from pathlib import Path

import faust
import pytest

from app.faust_producer import scope_producer_metadata
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
