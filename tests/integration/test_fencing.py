"""KIP-447 fencing (app/runtime/fencing.py) on the real broker: what one transaction per worker step would rely on
instead of one transactional id per partition (docs/kip447-fencing.md).

- a member's offsets sent with TxnOffsetCommit v3 are committed with its transaction, not with an abort;
- after a rebalance, the offsets of the member's older generation are refused (ILLEGAL_GENERATION), and so are
  those of a member that left (UNKNOWN_MEMBER_ID): its transaction cannot commit them; offsets taken before the
  rebalance commit after it, and a new owner reading with require_stable waits for them;
- OffsetFetch v7 require_stable waits (UNSTABLE_OFFSET_COMMIT) while a transaction holding offsets of a partition
  is open, and answers once it is committed or aborted;
- a transaction its producer left open (the process killed) holds such readers until the transaction timeout,
  and a new producer of the same transactional id aborts it at once (InitProducerId) and fences the old one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import ProducerFenced

from app.runtime import fencing
from app.runtime.fencing import OffsetsFencedError, fetch_stable_offsets, group_metadata, send_offsets, stable_committed
from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
#: Consumers notice a rebalance within this (aiokafka's default is 3 s).
HEARTBEAT_MS = 300


async def _member(bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    """A started member of `group` subscribed to `topic`, with its first assignment."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                heartbeat_interval_ms=HEARTBEAT_MS, isolation_level="read_committed")
    await consumer.start()
    deadline = time.monotonic() + 30
    while not consumer.assignment():
        assert time.monotonic() < deadline, "no assignment within 30 s"
        await consumer.getmany(timeout_ms=100)
    return consumer


async def _fenced_producer(bootstrap: str, transactional_id: str, timeout_ms: int = 60000) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id,
                                transaction_timeout_ms=timeout_ms)
    await producer.start()
    fencing.fence_offsets(producer)
    return producer


@pytest.fixture
async def stop_after() -> AsyncIterator[Callable[[Any], Any]]:
    """Register started clients (consumers, producers, clients): stopped after the test, in reverse order."""
    started: list[Any] = []
    yield lambda client: started.append(client) or client
    for client in reversed(started):
        await (client.close() if isinstance(client, AIOKafkaClient) else client.stop())


async def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)


async def test_the_broker_takes_txn_offset_commit_v3_and_offset_fetch_v7(kafka_bootstrap: str,
                                                                      stop_after: Callable[[Any], Any]) -> None:
    """Its ApiVersions answer has both (Kafka 4.1.1: TxnOffsetCommit v0-v5, OffsetFetch v1-v9)."""
    client = stop_after(await _started_client(kafka_bootstrap))
    assert await fencing.missing_versions(client) == []


async def test_a_members_offsets_are_committed_with_its_transaction_not_with_an_abort(
        kafka_bootstrap: str, topic_factory: TopicFactory, stop_after: Callable[[Any], Any]) -> None:
    """(a) v3 with the current generation: the offsets are visible once the transaction commits (to a
    require_stable reader and to aiokafka's ordinary committed()), and an aborted transaction's are not."""
    topic = topic_factory(2)
    group = f"{topic}-group"
    member = stop_after(await _member(kafka_bootstrap, topic, group))
    meta = group_metadata(member)
    assert meta.generation_id >= 1 and meta.member_id and meta.group_id == group
    producer = stop_after(await _fenced_producer(kafka_bootstrap, f"{topic}-txn"))
    tp = TopicPartition(topic, 0)

    await producer.begin_transaction()
    await send_offsets(producer, {tp: 5}, meta)
    await producer.commit_transaction()
    assert (await stable_committed(member, [tp])).offsets == {tp: 5}
    assert await member.committed(tp) == 5

    await producer.begin_transaction()
    await send_offsets(producer, {tp: 8}, meta)
    await producer.abort_transaction()
    assert (await stable_committed(member, [tp])).offsets == {tp: 5}
    assert await member.committed(tp) == 5


async def _committed_values(bootstrap: str, topic: str) -> list[bytes]:
    """Every value of `topic` (one partition) a read_committed reader outside any group sees."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, isolation_level="read_committed",
                              enable_auto_commit=False)
    await reader.start()
    try:
        tp = TopicPartition(topic, 0)
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        end = (await reader.end_offsets([tp]))[tp]  # read_committed: the last stable offset
        values: list[bytes] = []
        while await reader.position(tp) < end:
            values += [record.value for record in (await reader.getmany(tp, timeout_ms=500)).get(tp, [])]
        return values
    finally:
        await reader.stop()


async def test_after_a_rebalance_the_old_generations_offsets_are_refused(
        kafka_bootstrap: str, topic_factory: TopicFactory, stop_after: Callable[[Any], Any]) -> None:
    """(b) A second member joins: the generation moves on, and the first member's offsets sent under its old
    generation are refused (ILLEGAL_GENERATION); its transaction cannot commit them, nor the output it wrote, only
    abort. Under its new generation they are taken. Once it left the group, its member id is refused
    (UNKNOWN_MEMBER_ID)."""
    topic, output = topic_factory(2), topic_factory(1, suffix="out")
    group = f"{topic}-group"
    first = stop_after(await _member(kafka_bootstrap, topic, group))
    old = group_metadata(first)
    second = stop_after(await _member(kafka_bootstrap, topic, group))
    await _wait_for(lambda: group_metadata(first).generation_id > old.generation_id
                    and group_metadata(second).generation_id == group_metadata(first).generation_id,
                    "both members in the next generation")
    producer = stop_after(await _fenced_producer(kafka_bootstrap, f"{topic}-txn"))
    tp = TopicPartition(topic, 0)

    await producer.begin_transaction()
    await producer.send_and_wait(output, b"old generation")
    with pytest.raises(OffsetsFencedError, match=f"generation {old.generation_id}: .*ILLEGAL_GENERATION"):
        await send_offsets(producer, {tp: 5}, old)
    with pytest.raises(OffsetsFencedError):
        await producer.commit_transaction()
    await producer.abort_transaction()
    assert (await stable_committed(second, [tp])).offsets == {tp: None}

    current = group_metadata(first)
    await producer.begin_transaction()
    await producer.send_and_wait(output, b"current generation")
    await send_offsets(producer, {tp: 6}, current)
    await producer.commit_transaction()
    assert (await stable_committed(second, [tp])).offsets == {tp: 6}
    assert await _committed_values(kafka_bootstrap, output) == [b"current generation"]

    await first.stop()  # leaves the group: its member id is no longer one of the group's
    await producer.begin_transaction()
    with pytest.raises(OffsetsFencedError, match="UNKNOWN_MEMBER_ID"):
        await send_offsets(producer, {tp: 7}, current)
    await producer.abort_transaction()
    assert (await stable_committed(second, [tp])).offsets == {tp: 6}


async def test_offsets_taken_before_a_rebalance_commit_after_it_and_the_new_owner_waits_for_them(
        kafka_bootstrap: str, topic_factory: TopicFactory, stop_after: Callable[[Any], Any]) -> None:
    """(b, the window KIP-447 leaves) Offsets the coordinator took under the old generation stay in the open
    transaction: its commit after the rebalance succeeds (EndTxn is not checked against the group). A new owner
    reading with require_stable after the rebalance waits for that commit and starts from it: nothing is read
    twice."""
    topic = topic_factory(2)  # one partition for each member: _member waits for an assignment
    group = f"{topic}-group"
    first = stop_after(await _member(kafka_bootstrap, topic, group))
    old = group_metadata(first)
    producer = stop_after(await _fenced_producer(kafka_bootstrap, f"{topic}-txn"))
    tp = TopicPartition(topic, 0)
    await producer.begin_transaction()
    await send_offsets(producer, {tp: 5}, old)  # taken: the generation is still current

    second = stop_after(await _member(kafka_bootstrap, topic, group))
    await _wait_for(lambda: group_metadata(first).generation_id > old.generation_id
                    and group_metadata(second).generation_id == group_metadata(first).generation_id,
                    "both members in the next generation")
    reader = asyncio.ensure_future(stable_committed(second, [tp]))
    await asyncio.sleep(1.0)
    assert not reader.done()
    await producer.commit_transaction()
    stable = await asyncio.wait_for(reader, 10)
    assert stable.offsets == {tp: 5} and stable.unstable_answers >= 1


async def test_an_open_transactions_offsets_hold_stable_readers_until_it_ends(
        kafka_bootstrap: str, topic_factory: TopicFactory, stop_after: Callable[[Any], Any]) -> None:
    """(c) While a transaction holding offsets of a partition is open, OffsetFetch v7 require_stable answers
    UNSTABLE_OFFSET_COMMIT for it (the reader keeps asking) and the committed offset once the transaction committed
    or aborted; a partition the transaction holds no offsets of is answered at once. aiokafka's own OffsetFetch
    (no require_stable) answers at once with the offset before the transaction: what a new owner must not start
    from."""
    topic = topic_factory(2)
    group = f"{topic}-group"
    member = stop_after(await _member(kafka_bootstrap, topic, group))
    meta = group_metadata(member)
    producer = stop_after(await _fenced_producer(kafka_bootstrap, f"{topic}-txn"))
    held, free = TopicPartition(topic, 0), TopicPartition(topic, 1)

    for end, expected in (("commit", 5), ("abort", 5)):
        await producer.begin_transaction()
        await send_offsets(producer, {held: 5 if end == "commit" else 9}, meta)
        reader = asyncio.ensure_future(stable_committed(member, [held, free]))
        other = await asyncio.wait_for(stable_committed(member, [free]), 10)
        assert other.unstable_answers == 0
        assert await member.committed(held) == (None if end == "commit" else 5)
        await asyncio.sleep(1.0)
        assert not reader.done(), f"a require_stable reader answered while the transaction was open: {reader}"
        ended = time.monotonic()
        await (producer.commit_transaction() if end == "commit" else producer.abort_transaction())
        stable = await asyncio.wait_for(reader, 10)
        late = time.monotonic() - ended
        assert stable.offsets == {held: expected, free: None}
        assert stable.unstable_answers >= 5  # asked again every 50 ms for at least a second
        assert late < 5.0, late
        print(f"\n{end}: {stable.unstable_answers} UNSTABLE_OFFSET_COMMIT answers in {stable.waited_s:.2f} s; "
              f"answered {late * 1000:.0f} ms after the {end} returned")


#: The producer of a process that is killed with a transaction open: it commits offset 4, then opens a transaction
#: with offset 5 (of the group's member it is) and says so; it never ends it.
_DOOMED = """
import asyncio, sys
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from app.runtime import fencing

async def main(bootstrap, topic, group, transactional_id, timeout_ms):
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=100)
    meta = fencing.group_metadata(consumer)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id,
                                transaction_timeout_ms=int(timeout_ms))
    await producer.start()
    fencing.fence_offsets(producer)
    tp = TopicPartition(topic, 0)
    await producer.begin_transaction()
    await fencing.send_offsets(producer, {tp: 4}, meta)
    await producer.commit_transaction()
    await producer.begin_transaction()
    await fencing.send_offsets(producer, {tp: 5}, meta)
    print("open", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""


def _open_and_kill(bootstrap: str, topic: str, group: str, transactional_id: str, timeout_ms: int) -> float:
    """Run _DOOMED until its transaction is open, then SIGKILL it; returns the monotonic time of the kill."""
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_DOOMED), bootstrap, topic, group,
                                transactional_id, str(timeout_ms)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "open"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    return time.monotonic()


async def _started_client(bootstrap: str) -> AIOKafkaClient:
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    return client


@pytest.mark.slow
async def test_a_killed_producers_transaction_holds_stable_readers_until_its_timeout(
        kafka_bootstrap: str, topic_factory: TopicFactory, stop_after: Callable[[Any], Any]) -> None:
    """(d) A process killed with a transaction open (transaction.timeout.ms 3 s): require_stable readers of its
    partition wait until the transaction coordinator aborts it, at the timeout plus up to its check interval
    (transaction.abort.timed.out.transaction.cleanup.interval.ms, 10 s by default); then they read the offset
    committed before it."""
    topic = topic_factory(1)
    group = f"{topic}-group"
    timeout_s = 3.0
    killed = await asyncio.to_thread(_open_and_kill, kafka_bootstrap, topic, group, f"{topic}-txn",
                                     int(timeout_s * 1000))
    client = stop_after(await _started_client(kafka_bootstrap))
    tp = TopicPartition(topic, 0)
    stable = await fetch_stable_offsets(client, group, [tp], timeout=60)
    held = time.monotonic() - killed
    assert stable.offsets == {tp: 4}  # the open transaction's 5 was aborted
    assert stable.unstable_answers >= 1
    assert timeout_s - 1.0 <= held <= timeout_s + 10.0 + 5.0, held
    print(f"\nkilled producer, transaction.timeout.ms {timeout_s * 1000:.0f}: readers held {held:.2f} s after the kill "
          f"({stable.unstable_answers} UNSTABLE_OFFSET_COMMIT answers)")


async def test_a_new_producer_of_the_transactional_id_aborts_the_open_transaction_at_once(
        kafka_bootstrap: str, topic_factory: TopicFactory, stop_after: Callable[[Any], Any]) -> None:
    """(d) A transaction left open (a producer that never ends it; transaction.timeout.ms 60 s) holds require_stable
    readers; a new producer of the same transactional id (InitProducerId, what a restarted worker does first)
    aborts it at once: the readers get the offset committed before it, and the old producer is fenced (its commit
    fails). The same after a kill: the new producer frees the readers well before the timeout."""
    topic = topic_factory(1)
    group = f"{topic}-group"
    member = stop_after(await _member(kafka_bootstrap, topic, group))
    meta = group_metadata(member)
    transactional_id = f"{topic}-txn"
    tp = TopicPartition(topic, 0)

    zombie = stop_after(await _fenced_producer(kafka_bootstrap, transactional_id))
    await zombie.begin_transaction()
    await send_offsets(zombie, {tp: 4}, meta)
    await zombie.commit_transaction()
    await zombie.begin_transaction()
    await send_offsets(zombie, {tp: 5}, meta)
    reader = asyncio.ensure_future(stable_committed(member, [tp]))
    await asyncio.sleep(1.0)
    assert not reader.done()
    started = time.monotonic()
    successor = stop_after(await _fenced_producer(kafka_bootstrap, transactional_id))
    stable = await asyncio.wait_for(reader, 10)
    freed = time.monotonic() - started
    assert stable.offsets == {tp: 4}
    assert freed < 5.0, freed
    with pytest.raises(ProducerFenced):
        await zombie.commit_transaction()
    print(f"\nnew producer of the transactional id: readers freed {freed * 1000:.0f} ms after it started")

    # The same after a kill (transaction.timeout.ms 60 s, a new group and transactional id).
    await successor.stop()
    killed = await asyncio.to_thread(_open_and_kill, kafka_bootstrap, topic, f"{group}-2", f"{transactional_id}-2",
                                     60000)
    client = stop_after(await _started_client(kafka_bootstrap))
    reader = asyncio.ensure_future(fetch_stable_offsets(client, f"{group}-2", [tp]))
    await asyncio.sleep(1.0)
    assert not reader.done()
    started = time.monotonic()
    stop_after(await _fenced_producer(kafka_bootstrap, f"{transactional_id}-2"))
    stable = await asyncio.wait_for(reader, 10)
    freed = time.monotonic() - started
    assert stable.offsets == {tp: 4}
    assert freed < 5.0 and time.monotonic() - killed < 30.0
    print(f"after a kill: readers freed {freed * 1000:.0f} ms after the new producer started")
