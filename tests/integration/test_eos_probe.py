"""app.eos.InOrder's side consumer on the real broker: it finds the first committed record a partition has
from an offset on; closing stops it, and the app's shutdown signal closes it (no consumer left after the worker)."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import TP

from app import eos
from app.eos import InOrder
from tests.conftest import TopicFactory
from tests.integration.worker_harness import produce_numbered


async def test_the_probe_finds_the_first_committed_record_and_close_stops_it(
        kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = topic_factory()
    await produce_numbered(kafka_bootstrap, topic, range(3))
    state = InOrder(kafka_bootstrap)
    assert await state._first_record_from(TP(topic, 0), 1, 3) == 1
    probe = state._probe
    assert probe is not None and probe._closed is False

    await state.close()

    assert state._probe is None
    assert probe._closed is True
    await state.close()  # a second close (or one without a probe) does nothing


async def test_the_apps_shutdown_signal_stops_the_probe(kafka_bootstrap: str, topic_factory: TopicFactory,
                                                       tmp_path: Path) -> None:
    topic = topic_factory()
    await produce_numbered(kafka_bootstrap, topic, range(3))
    app = faust.App(f"eos-probe-{uuid.uuid4().hex[:6]}", broker=f"kafka://{kafka_bootstrap}", datadir=str(tmp_path),
                    autodiscover=False, env={}, web_enabled=False, processing_guarantee="exactly_once")
    eos.install(app, kafka_bootstrap)
    state = eos.order_of(app)
    assert state is not None
    assert await state._first_record_from(TP(topic, 0), 0, 3) == 0
    probe = state._probe
    assert probe is not None

    await app.on_before_shutdown.send()

    assert state._probe is None
    assert probe._closed is True


async def test_the_groups_committed_offset_comes_from_the_coordinator(
        kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    """Where faust has not recorded a partition's committed offset yet, in_order reads the group's from the
    coordinator (-1 for a partition the group never committed, which then starts at its log start under the offset
    reset "earliest"); closing stops its admin client."""
    topic = topic_factory()
    await produce_numbered(kafka_bootstrap, topic, range(3))
    group = f"eos-probe-{uuid.uuid4().hex[:6]}"
    committer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    await committer.start()
    try:
        committer.assign([TopicPartition(topic, 0)])
        await committer.commit({TopicPartition(topic, 0): 2})
    finally:
        await committer.stop()
    state = InOrder(kafka_bootstrap)
    app = SimpleNamespace(conf=SimpleNamespace(id=group))
    try:
        assert await state._group_committed(app, TP(topic, 0)) == 2  # type: ignore[arg-type]
        other = SimpleNamespace(conf=SimpleNamespace(id=f"{group}-other"))
        assert await state._group_committed(other, TP(topic, 0)) == -1  # type: ignore[arg-type]
        earliest = SimpleNamespace(conf=SimpleNamespace(id=group, consumer_auto_offset_reset="earliest"))
        assert await state._reset_offset(earliest, TP(topic, 0)) == 0  # type: ignore[arg-type]
        latest = SimpleNamespace(conf=SimpleNamespace(id=group, consumer_auto_offset_reset="latest"))
        assert await state._reset_offset(latest, TP(topic, 0)) is None  # type: ignore[arg-type]
    finally:
        await state.close()
    assert state._admin is None
