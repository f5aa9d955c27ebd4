"""Exactly-once for byzguard on faust-streaming 0.15.3: the parts faust's `exactly_once` leaves out.

Faust runs one transactional producer per input partition and commits the input offsets in that
producer's transaction. Four gaps (docs/exactly-once.md has the evidence) make that not exactly-once:

1. `TransactionManager.send` picks the transactional producer from the *output* topic: it asks the
   consumer's metadata for the topic's partitions (unknown for a topic the worker does not consume, so
   the record goes through the plain producer, outside any transaction) and then the assignor for the
   topic's group (a KeyError for the same topics once the metadata does know them). Fixed here: a record
   sent while a stream event is processed goes through the transactional producer of that event's
   partition, the one that commits the event's offset.
2. Table changelog writes wait in faust's ProducerBuffer; the exactly-once commit does not flush it, so
   a state write can land in the next transaction while the offset that caused it is already committed.
   Fixed here: a commit first waits for every buffered changelog write to be delivered.
3. The commit timer runs concurrently with the agent: it can snapshot the acked offsets while an event is
   half routed, or commit an event's outputs while its offset waits for the next transaction. Fixed here:
   each event is processed (and acked) under a lock that the commit also takes, so a transaction holds
   exactly the outputs and state writes of the offsets it commits.
4. RocksDB is written at once, not at commit: after a crash the local store holds writes of aborted
   transactions, and the re-delivered events look like duplicates of themselves. Fixed here: a worker
   that did not stop cleanly discards its local tables at the next start and restores them from the
   (read_committed) changelogs, as Kafka Streams does under exactly-once.
5. Not a correctness gap but a 10-second one: a transactional changelog ends with a commit or abort
   marker that a read_committed consumer never delivers, so faust's recovery waits for two 5-second
   idle timeouts before it believes it is done, after every restart and every rebalance. Fixed here: a
   side consumer checks whether any committed record is left after what recovery applied; if none is,
   recovery ends at once.

`install(app, bootstrap)` wires 1-3 and 5 into the app (before its consumer and producer exist); agents
wrap each event in `processing(app, event)`; the CLI runs the worker inside `crash_safe_state(...)` for 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.streams import current_event
from faust.tables.recovery import Recovery
from faust.transport.consumer import TransactionManager
from faust.types import TP
from faust.types.tuples import FutureMessage, ack_lock
from mode import Service
from mode.utils.futures import notify

log = logging.getLogger(__name__)

#: How long a commit waits for buffered changelog writes before it gives up and crashes the worker.
CHANGELOG_DELIVERY_TIMEOUT = 60.0

#: How often recovery looks whether only transaction markers are left, and how long one look may take.
TAIL_CHECK_INTERVAL = 0.25
TAIL_CHECK_TIMEOUT = 5.0

#: Present in the data dir while a worker runs; still there at start means the last worker crashed.
RUNNING_MARKER = "byzguard-worker.running"

_STATE_ATTR = "_byzguard_eos"


class ExactlyOnce:
    """Per-app state: the processing lock and the changelog writes not yet delivered."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.pending: set[FutureMessage] = set()
        self.warned_topics: set[str] = set()
        self.last_offsets: dict[TP, int] = {}
        #: Topics whose records only `processing` may ack (their agent processes every record it acks).
        self.guarded_topics: set[str] = set()
        self.acking = False

    def drop(self, consumer: Any, message: Any) -> bool:
        """Let faust forget a record it never gave the agent, without marking its offset committable.

        Faust acks records its stream skipped (flow stopped, or a generation changed, during a rebalance) "so
        the lag does not grow"; the commit in the rebalance then moves past them and they are lost. Dropped
        here instead, the offset stays a gap: the next commit stops before it, and after the rebalance the
        consumer seeks back to the committed offset and the record is delivered again.
        """
        with ack_lock:
            if not message.acked:
                message.acked = True  # nothing waits for it any more (Consumer.wait_empty)
                consumer._unacked_messages.discard(message)
                notify(consumer._waiting_for_ack)
        return False

    def track(self, fut: FutureMessage) -> None:
        """Remember a buffered send until it is delivered (or fails)."""
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)

    async def wait_delivered(self) -> None:
        """Wait until every buffered send so far is delivered; raise if one failed."""
        pending = list(self.pending)
        if pending:
            async with asyncio.timeout(CHANGELOG_DELIVERY_TIMEOUT):
                await asyncio.gather(*pending)


def state_of(app: faust.App) -> ExactlyOnce | None:
    """The exactly-once state installed on `app`, or None (at_least_once)."""
    return getattr(app, _STATE_ATTR, None)


def install(app: faust.App, bootstrap: str) -> ExactlyOnce:
    """Give `app` the fixed transaction manager, consumer, producer and recovery. Call before start."""
    if app._consumer is not None or app._producer is not None:  # type: ignore[attr-defined]
        raise RuntimeError("eos.install must run before the app's consumer and producer are created")
    state = ExactlyOnce()
    setattr(app, _STATE_ATTR, state)
    tables: Any = app.tables
    if tables._recovery is not None:
        raise RuntimeError("eos.install must run before the table manager builds its recovery service")
    tables._recovery = MarkerAwareRecovery(app, tables, bootstrap=bootstrap, beacon=tables.beacon)
    transport: Any = app.transport
    base_consumer = transport.Consumer
    base_producer = transport.Producer

    class Consumer(base_consumer):  # type: ignore[valid-type,misc]
        async def commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
            # Under the processing lock no event is half done: every acked offset has all its outputs in
            # its partition's transaction and every unacked one has none.
            async with state.lock:
                await state.wait_delivered()
                committed: bool = await super().commit(topics, start_new_transaction=start_new_transaction)
                return committed

        def ack(self, message: Any) -> bool:
            if message.topic in state.guarded_topics and not state.acking:
                return state.drop(self, message)
            acked: bool = super().ack(message)
            return acked

        async def position(self, tp: TP) -> int | None:
            # Only faust's table recovery asks (Recovery._slurp_changelogs.detect_aborted_tx), to end recovery
            # once the fetch position passed the highwater. The position runs ahead of the records recovery has
            # applied (they are still on their way through the fetcher), and the check fires on a timeout
            # counter that is not reset when recovery starts: recovery then ends with records missing from the
            # tables. MarkerAwareRecovery ends recovery on an exact criterion instead, so this one never fires.
            return -1

    class Producer(base_producer):  # type: ignore[valid-type,misc]
        def send_soon(self, fut: FutureMessage) -> None:
            state.track(fut)
            super().send_soon(fut)

    transport.TransactionManager = EventTransactionManager
    transport.Consumer = Consumer
    transport.Producer = Producer
    return state


class EventTransactionManager(TransactionManager):
    """Sends each record through the transactional producer of the input partition that caused it."""

    async def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                   timestamp: float | None, headers: Any, *, transactional_id: str | None = None) -> Any:
        """Schedule a record on the transaction of the current event's partition."""
        transactional_id = self._transactional_id(topic, key, partition)
        return await self.producer.send(topic, key, value, partition, timestamp, headers,
                                        transactional_id=transactional_id)

    def _transactional_id(self, topic: str, key: bytes | None, partition: int | None) -> str | None:
        event = current_event()
        if event is not None:
            source: TP = event.message.tp
            return self._id_for(self.app.assignor.group_for_topic(source.topic), source.partition)
        # No event (the table buffer's task, a timer): a topic the worker consumes has a producer per
        # partition, as faust intends (changelogs are co-partitioned with the event that wrote them).
        try:
            group = self.app.assignor.group_for_topic(topic)
        except KeyError:
            group = None
        if group is not None:
            p = self.consumer.key_partition(topic, key, partition)
            if p is not None:
                return self._id_for(group, p)
        state = state_of(self.app)
        if state is not None and topic not in state.warned_topics:
            state.warned_topics.add(topic)
            log.warning("send to %r outside any stream event: not part of a transaction", topic)
        return None

    def _id_for(self, group: int, partition: int) -> str:
        return f"{self.app.conf.id}-{group}-{partition}"


class MarkerAwareRecovery(Recovery):
    """Table recovery that ends as soon as nothing but transaction markers or aborted records is left."""

    def __init__(self, app: faust.App, tables: Any, *, bootstrap: str, **kwargs: Any) -> None:
        self.bootstrap = bootstrap
        super().__init__(app, tables, **kwargs)

    @Service.task
    async def _end_at_transaction_markers(self) -> None:
        tail: AIOKafkaConsumer | None = None
        try:
            while not self.should_stop:
                await self.sleep(TAIL_CHECK_INTERVAL)
                if not self.in_recovery or not self.tables.changelog_queue.empty():
                    continue
                behind = {tp: offset for tp, highwater in self.active_highwaters.items()
                          if highwater is not None and (offset := self.active_offsets[tp]) is not None
                          and offset < highwater}
                if not behind:
                    continue
                if tail is None:
                    tail = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                            enable_auto_commit=False, isolation_level="read_committed")
                    await tail.start()
                ends = {tp: self.active_highwaters[tp] + 1 for tp in behind}
                finished = await _nothing_committed_after(tail, behind, ends)
                # Recovery may have moved on while we looked: only what did not change is decided.
                if not self.in_recovery or not self.tables.changelog_queue.empty():
                    continue
                for tp in finished:
                    if self.active_offsets[tp] == behind[tp]:
                        self.active_offsets[tp] = self.active_highwaters[tp]
                if finished and not self.need_recovery():
                    self.log.info("Only transaction markers left in %d changelog partition(s): recovery done",
                                  len(finished))
                    self.flush_buffers()
                    self._set_recovery_ended()
                    self.signal_recovery_end.set()
        finally:
            if tail is not None:
                await tail.stop()


async def _nothing_committed_after(consumer: AIOKafkaConsumer, applied: dict[TP, int],
                                   ends: dict[TP, int]) -> set[TP]:
    """The partitions whose read_committed position passes `ends` with no record after `applied`."""
    by_tp = {TopicPartition(tp.topic, tp.partition): tp for tp in applied}
    consumer.assign(list(by_tp))
    for atp, tp in by_tp.items():
        consumer.seek(atp, applied[tp] + 1)
    undecided = set(by_tp)
    finished: set[TP] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TAIL_CHECK_TIMEOUT
    while undecided and loop.time() < deadline:
        batch = await consumer.getmany(*undecided, timeout_ms=200)
        for atp, records in batch.items():
            if records:  # a committed record recovery has not applied yet: not done
                undecided.discard(atp)
        for atp in list(undecided):
            # read_committed never passes the last stable offset, so reaching the end also means no
            # transaction is still open there.
            if await consumer.position(atp) >= ends[by_tp[atp]]:
                finished.add(by_tp[atp])
                undecided.discard(atp)
    return finished


@contextlib.asynccontextmanager
async def processing(app: faust.App, event: faust.EventT) -> AsyncIterator[None]:
    """Process one event atomically with respect to commits; ack it on success, inside the lock."""
    state = state_of(app)
    if state is None:
        yield
        return
    async with state.lock:
        tp = event.message.tp
        last = state.last_offsets.get(tp)
        if last is not None and event.message.offset != last + 1:
            log.warning("DIAG %s: processed offset %d after %d", tp, event.message.offset, last)
        state.last_offsets[tp] = event.message.offset
        yield
        # Acked here, not when the stream moves on: a commit between the two would leave this event's
        # outputs in a transaction that does not commit its offset.
        state.acking = True
        try:
            event.ack()
        finally:
            state.acking = False


def guard(app: faust.App, topics: faust.TopicT) -> None:
    """Let only `processing` ack records of `topics` (see ExactlyOnce.drop); no-op without exactly-once."""
    state = state_of(app)
    if state is not None:
        state.guarded_topics.update(topics.topics)


@contextlib.contextmanager
def crash_safe_state(data_dir: Path, table_dir: Path, *, enabled: bool) -> Iterator[None]:
    """Run a worker; if the previous one on `data_dir` did not stop cleanly, drop its local tables first."""
    if not enabled:
        yield
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = data_dir / RUNNING_MARKER
    if marker.exists() and table_dir.exists():
        log.warning("the last worker on %s did not stop cleanly: its local tables may hold writes of "
                    "aborted transactions; discarding %s, state is restored from the changelogs",
                    data_dir, table_dir)
        shutil.rmtree(table_dir)
    marker.write_text(f"{os.getpid()}\n")
    clean = False
    try:
        yield
        clean = True
    except SystemExit as exc:
        clean = exc.code in (0, None)
        raise
    finally:
        if clean:
            marker.unlink(missing_ok=True)
