"""Entity records of the earlier format in a real changelog: a worker restores them and routes against them."""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from byzguard.config import load
from byzguard.envelope import Envelope, decode
from byzguard.guard import ENTITIES, Guard, RecordIn
from byzguard.stamp import Stamped
from byzguard.state import FORMAT, EntityState
from tests.integration.worker_harness import (
    SECRETS,
    Events,
    WorkerFactory,
    by_id,
    collect,
    produce,
    wait_caught_up,
    wipe,
)
from tests.unit.test_state import format_2

pytestmark = pytest.mark.kafka


def legacy(state: EntityState, ids: list[tuple[str, bytes, float, int | None]]) -> bytes:
    """`state` in the orjson list format earlier releases wrote, with these (id, content hash, seen at, version)
    entries."""
    return orjson.dumps([
        1, state.version, state.vclock.to_header().decode() if state.vclock else None, state.content_hash.hex(),
        state.last_good.decode("latin-1"), state.last_good_type, state.verified_at, state.event_time,
        [[event_id, content.hex(), seen_at, version] for event_id, content, seen_at, version in ids]])


def content_of(stamped: Stamped) -> bytes:
    """The content hash byzguard keeps for an event."""
    env = decode(stamped.key, stamped.value, stamped.headers)
    assert isinstance(env, Envelope)
    return env.content_hash


async def _changelog(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]] | None = None
                     ) -> dict[bytes, bytes]:
    """Write `records` to partition 0 of the changelog, or read its last value per key."""
    if records is not None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for key, value in records:
                await producer.send_and_wait(topic, value, key=key, partition=0)
        finally:
            await producer.stop()
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        last: dict[bytes, bytes] = {}
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                for r in records:
                    if r.key is not None and r.value is not None:
                        last[r.key] = r.value
        return last
    finally:
        await consumer.stop()


@pytest.mark.parametrize(("write", "mark"), [(legacy, b"["), (format_2, b"\x02")], ids=["format-1", "format-2"])
async def test_records_of_the_earlier_format_are_restored_routed_against_and_rewritten(
    worker_factory: WorkerFactory, write: Callable[[EntityState, list[tuple[str, bytes, float, int | None]]], bytes],
    mark: bytes,
) -> None:
    """A changelog holding entity records of an earlier format (the orjson list, or format 2's 40-byte entries)
    restores into a worker on an empty data dir: a re-sent old event is a duplicate, an old id with new content
    is id.reused, an old version is version.regression, the next version passes, and its record is written back
    in the current format."""
    route = worker_factory.configure(partitions=1)
    assert worker_factory.config_path is not None
    data_dir = worker_factory.base_dir / "state"
    changelog = f"{worker_factory.app_id}-orders-state_by_entity-changelog"
    first = worker_factory.start("provision", data_dir=data_dir)  # creates the topics, changelog included
    assert first.stop() == 0, first.fail("did not stop cleanly").args[0]
    wipe(data_dir)

    # The history of acct-0 and acct-1 (versions 1-3), as the previous release kept it.
    events = Events()
    config = load(worker_factory.config_path, environ=SECRETS)
    guard, tables = Guard(config), {ENTITIES: {}, "lamports": {}, "causal": {}}
    history = {s: [events.clean(s, v) for v in (1, 2, 3)] for s in ("acct-0", "acct-1")}
    now = time.time()
    for stamped in history.values():
        for offset, s in enumerate(stamped):
            record = RecordIn(s.key, s.value, s.headers, route.input, 0, offset, now)
            result = guard.process(record, config.routes[0], tables, now=now)
            assert result.first.decision.outcome.value == "verified"
            for (table, key), value in result.writes.items():
                tables[table][key] = value  # type: ignore[assignment]
    olds = [(subject.encode(), write(EntityState.from_bytes(tables[ENTITIES][subject.encode()]),
                                     [(s.event_id, content_of(s), now, v) for v, s in enumerate(stamped, 1)]))
            for subject, stamped in history.items()]
    assert all(value[:1] == mark for _, value in olds)
    await _changelog(worker_factory.bootstrap, changelog, olds)

    worker = worker_factory.start("restored", data_dir=data_dir)
    resent = history["acct-0"][1]  # version 2, again: only its id says it was seen
    old_id = history["acct-1"][0]
    reused = events.orders.binary({"order": "acct-1", "version": 4, "amount": 1.0}, type="order.confirmed",
                                  subject="acct-1", version=4, time=time.time(), event_id=old_id.event_id)
    regression = events.regression("acct-0", 2)
    following = events.clean("acct-0", 4)
    await produce(worker_factory.bootstrap, route.input, [resent, reused, regression, following])
    await wait_caught_up(worker_factory.bootstrap, worker_factory.app_id, [route.input], workers=(worker,))

    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=1))
    quarantined = by_id(await collect(worker_factory.bootstrap, route.quarantine, expected=2))
    assert set(verified) == {following.event_id}, verified
    assert verified[following.event_id][0].header("byzguard_verdict") == b"pass"
    assert {i: out[0].codes for i, out in quarantined.items()} == {
        old_id.event_id: {"id.reused"}, regression.event_id: {"version.regression"}}
    assert worker.stop() == 0, worker.fail("did not stop cleanly").args[0]

    written = await _changelog(worker_factory.bootstrap, changelog)
    assert written[b"acct-0"][0] == FORMAT  # rewritten on its next verified event
    assert written[b"acct-1"][:1] == mark  # untouched: nothing verified for it
    assert EntityState.from_bytes(written[b"acct-0"]).version == 4
