"""Cases of the batched runtime on the real broker that the faust agent runtime of earlier releases needed fixes for
(docs/exactly-once.md) or that no other test puts to it: inputs written in transactions (commit markers,
interleaved transactions), a route with several input topics, a local state whose changelog offset is past its
changelog's end, and one that last stored longer ago than its changelog keeps tombstones."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from app.runtime.state import OFFSET_KEY, STORED_AT_KEY, PartitionState, restore, state_names
from byzguard.config import load
from byzguard.guard import ENTITIES
from tests.conftest import TopicFactory
from tests.integration.worker_harness import (
    Events,
    WorkerFactory,
    by_id,
    collect,
    input_group,
    produce,
    wait_caught_up,
)

pytestmark = pytest.mark.kafka


async def _send_in_transactions(bootstrap: str, topic: str, records: list, *, per_transaction: int) -> None:
    """Send stamped records through transactional producers, `per_transaction` per transaction; the last two
    transactions interleaved (two commit markers side by side, the partition ending in a marker)."""
    a, b = (AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"t-{uuid.uuid4().hex[:8]}")
            for _ in range(2))
    await a.start()
    await b.start()
    try:
        head, last = records[:-2], records[-2:]
        for i in range(0, len(head), per_transaction):
            async with a.transaction():
                for r in head[i:i + per_transaction]:
                    await a.send_and_wait(topic, r.value, key=r.key, headers=r.headers)
        await a.begin_transaction()
        await b.begin_transaction()
        await a.send_and_wait(topic, last[0].value, key=last[0].key, headers=last[0].headers)
        await b.send_and_wait(topic, last[1].value, key=last[1].key, headers=last[1].headers)
        await a.commit_transaction()
        await b.commit_transaction()
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_an_input_written_in_transactions_is_routed_once_and_committed_past_its_markers(
        worker_factory: WorkerFactory, guarantee: str) -> None:
    """Records of an input written in transactions (a commit marker after each, two side by side, the partition
    ending in one) are each routed once, and the group commits every partition to its end: no lag of 1 stays
    behind a marker that no record follows (gap 7 of docs/exactly-once.md on the batched runtime)."""
    worker_factory.processing_guarantee = guarantee
    route = worker_factory.configure(partitions=2)
    worker = worker_factory.start("w")
    events = Events()
    sent = [events.clean(f"acct-{i}", 1) for i in range(30)]
    await _send_in_transactions(worker_factory.bootstrap, route.input, sent, per_transaction=4)
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input],
                         workers=[worker], timeout=60)
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=len(sent)))
    assert set(verified) == {s.event_id for s in sent}
    if guarantee == "exactly_once":
        assert all(len(records) == 1 for records in verified.values())
    more = [events.clean(f"acct-{i}", 2) for i in range(10)]  # after the markers: processed, nothing skipped
    await produce(worker_factory.bootstrap, route.input, more)
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input],
                         workers=[worker], timeout=60)
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=len(sent) + len(more)))
    assert set(verified) == {s.event_id for s in sent + more}


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_a_route_with_two_input_topics_routes_both_and_keeps_one_state_per_entity(
        worker_factory: WorkerFactory, guarantee: str) -> None:
    """A route reading two input topics routes the events of both; an entity's state is one across them (an old
    version on the second topic is a regression), and after a restart on the same data dir nothing is routed
    twice or judged a duplicate of itself."""
    worker_factory.processing_guarantee = guarantee
    route = worker_factory.configure(partitions=2)
    second = f"{route.input}-2"
    assert worker_factory.config_path is not None
    text = worker_factory.config_path.read_text()
    worker_factory.config_path.write_text(text.replace(f"inputs: [{route.input}]",
                                                       f"inputs: [{route.input}, {second}]"))
    data_dir = worker_factory.base_dir / "state"
    worker = worker_factory.start("first", data_dir=data_dir)
    events = Events()
    first = [events.clean(f"acct-{i}", 2) for i in range(20)]
    await produce(worker_factory.bootstrap, route.input, first)
    late = [events.regression(f"acct-{i}", 1) for i in range(5)]  # older than what the first topic brought
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input],
                         workers=[worker])
    other = [events.clean(f"acct-{i}", 3) for i in range(20)]
    await produce(worker_factory.bootstrap, second, [*late, *other])
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input, second],
                         workers=[worker])
    assert worker.stop() == 0
    again = worker_factory.start("again", data_dir=data_dir)
    more = [events.clean(f"acct-{i}", 4) for i in range(20)]
    await produce(worker_factory.bootstrap, second, more)
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input, second],
                         workers=[again])
    clean = first + other + more
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=len(clean)))
    quarantined = by_id(await collect(worker_factory.bootstrap, route.quarantine, expected=len(late)))
    assert set(verified) == {s.event_id for s in clean}
    assert all(len(records) == 1 for records in verified.values())
    assert set(quarantined) == {s.event_id for s in late}
    assert all("version.regression" in records[0].codes for records in quarantined.values())


async def test_a_local_state_whose_changelog_offset_is_past_the_changelogs_end_is_restored_from_the_changelog(
        kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path) -> None:
    """A database whose stored changelog offset is at or past its changelog's end (the changelog was recreated, or
    the database holds writes the changelog does not) is wiped and restored from the changelog: afterwards it holds
    exactly the changelog's records and its last offset, nothing of what it held before."""
    config_path = tmp_path / "byzguard.yaml"
    config_path.write_text("routes:\n  - {name: r, inputs: [in], verified_topic: out, quarantine_topic: bad,\n"
                           "      types: {t: {}}}\n")
    route = load(config_path).routes[0]
    changelogs = {name: topic_factory(1, {"cleanup.policy": "compact"}) for name in state_names(route)}
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for n in range(3):
            await producer.send_and_wait(changelogs[ENTITIES], b"v%d" % n, key=b"k%d" % n, partition=0)
    finally:
        await producer.stop()
    part = PartitionState(tmp_path / "tables", route, 0, {})
    try:
        db = part.dbs[ENTITIES]
        db[b"stale"] = b"written by a changelog that is gone"
        db[OFFSET_KEY] = b"50"  # past the changelog's end (3)
        await restore(kafka_bootstrap, [(part, changelogs)])
        assert part.changelog_offset(ENTITIES) == 2
        assert part.readers[ENTITIES].get(b"stale") is None
        assert dict(part.readers[ENTITIES].items()) == {b"k0": b"v0", b"k1": b"v1", b"k2": b"v2"}
    finally:
        part.close()


async def test_a_local_state_older_than_its_changelogs_tombstone_retention_is_restored_from_the_beginning(
        kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 20: compaction drops a tombstone once it is delete.retention.ms old, so a database that last stored
    longer ago than that may never see a delete written after its offset. Against the real broker: a database that
    stored 10 s ago, whose changelog keeps tombstones for 1 s (read from the topic), is wiped and restored from the
    changelog's beginning with a WARNING; the same database under changelogs with the default retention (24 h) is
    brought forward from its offset (what it holds that the changelog does not is kept: no restore from the
    beginning); one of an earlier release (no time recorded) is restored from the beginning. Each records when it
    was at its changelogs' end; an empty partition's recorded time alone does not get it wiped next time."""
    config_path = tmp_path / "byzguard.yaml"
    config_path.write_text("routes:\n  - {name: r, inputs: [in], verified_topic: out, quarantine_topic: bad,\n"
                           "      types: {t: {}}}\n")
    route = load(config_path).routes[0]
    short = {"cleanup.policy": "compact", "delete.retention.ms": "1000"}
    stale_topics = {name: topic_factory(1, short) for name in state_names(route)}
    fresh_topics = {name: topic_factory(2, {"cleanup.policy": "compact"}) for name in state_names(route)}
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for topics in (stale_topics, fresh_topics):
            for n in range(3):
                await producer.send_and_wait(topics[ENTITIES], b"v%d" % n, key=b"k%d" % n, partition=0)
    finally:
        await producer.stop()
    now_ms = int(time.time() * 1000)

    def local(where: str, stored_at: int | None) -> PartitionState:
        """A database that stored the changelog's first record, and a key the changelog does not hold (what a
        delete compacted away would leave behind)."""
        part = PartitionState(tmp_path / where, route, 0, {})
        db = part.dbs[ENTITIES]
        db[b"k0"] = b"v0"
        db[b"deleted-meanwhile"] = b"stale"
        db[OFFSET_KEY] = b"0"
        if stored_at is not None:
            db[STORED_AT_KEY] = str(stored_at).encode()
        return part

    aged, fresh, legacy = local("aged", now_ms - 10_000), local("fresh", now_ms), local("legacy", None)
    empty = PartitionState(tmp_path / "empty", route, 1, {})  # partition 1: nothing in its changelogs
    try:
        with caplog.at_level(logging.WARNING, logger="app.runtime.state"):
            replayed = await restore(kafka_bootstrap, [(aged, stale_topics)])
        assert aged.readers[ENTITIES].get(b"deleted-meanwhile") is None, "an aged database is not reused"
        assert dict(aged.readers[ENTITIES].items()) == {b"k0": b"v0", b"k1": b"v1", b"k2": b"v2"}
        assert replayed == 3, "restored from the changelog's beginning"
        assert any("delete.retention.ms (1000 ms)" in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records), caplog.text

        replayed = await restore(kafka_bootstrap, [(fresh, fresh_topics)])
        assert replayed == 2, "a fresh database is brought forward from its offset"
        assert fresh.readers[ENTITIES].get(b"deleted-meanwhile") == b"stale", "reused, not wiped"
        assert fresh.changelog_offset(ENTITIES) == 2

        replayed = await restore(kafka_bootstrap, [(legacy, fresh_topics)])
        assert replayed == 3 and legacy.readers[ENTITIES].get(b"deleted-meanwhile") is None, \
            "a data dir without the time is restored from the beginning (fail-safe)"
        for part in (aged, fresh, legacy):
            stored_at = part.stored_at()
            assert stored_at is not None and stored_at >= now_ms, "the restore records when it reached the end"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="app.runtime.state"):
            for _ in range(2):
                assert await restore(kafka_bootstrap, [(empty, fresh_topics)]) == 0
        assert empty.stored_at() is not None
        assert not caplog.records, "a partition with nothing to restore is not wiped for its restore time"
    finally:
        for part in (aged, fresh, legacy, empty):
            part.close()
