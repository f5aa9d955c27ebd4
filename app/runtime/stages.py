"""The batched runtime's other stages: what the loop (app/runtime/loop.py) runs for topics that are not a
route's verify input.

A *forward stage* maps each record of its topics to zero or more records keyed into an internal topic, with no
state of its own. Two kinds use it: a route with `partitioning: repartition` (`RouteRepartition`: every input
record, bytes and headers untouched, to `<app_id>-<route>-entities-repartition` at the murmur2 partition of
its key, with its input coordinates in one header; the route's verify stage then reads that topic as its
input), and an audit rule's forward half (app/runtime/audits.py `AuditForward`: observations re-keyed by join
key). `Forwards` runs them: one batch per source partition of at most `batch_max_records` records, then

- exactly_once: one transaction per source partition per batch (its own transactional producer, id
  `<app_id>-forward-<topic>-<partition>`, which fences a previous owner) holds the forwarded records and the
  source offsets (`send_offsets_to_transaction`, group `<app_id>-verify`);
- at_least_once: the forwarded records are delivered before the loop commits the source offsets.

A stateful stage (the audit join, app/runtime/audits.py `AuditJoins`) is a `Runner` too. `Stages` dispatches
by topic to the runner that reads it; the loop hands it every fetched partition it does not verify itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import IllegalOperation
from aiokafka.util import commit_structure_validate

from agents.verify import observe
from app.runtime.batches import RecordBatches, delivered
from app.runtime.limits import DEFAULT_LIMIT, load_limits
from byzguard.config import GuardConfig, Partitioning, Route
from byzguard.engine import Decision
from byzguard.guard import RecordIn, Routed
from byzguard.partitioner import partition_for
from byzguard.routing import (
    OWN_HEADERS_MAX,
    record_size,
    repartition_headers,
    repartitioned_from,
    too_large_stub,
)
from byzguard.verdict import Code, Outcome, Reason
from topics import route_repartition_topic_name

log = logging.getLogger(__name__)

def verify_topics(app_id: str, route: Route) -> list[str]:
    """The topics a route's verify stage reads: its inputs, or its repartition topic."""
    if route.partitioning is Partitioning.REPARTITION:
        return [route_repartition_topic_name(app_id, route)]
    return list(route.inputs)


def record_in(msg: Any, route: Route) -> RecordIn:
    """The record a route's verify stage judges for a consumed message (aiokafka's, timestamps in ms): on a
    repartitioning route, the input record its copy came from, at the partition it was copied to."""
    headers = msg.headers or ()
    if route.partitioning is Partitioning.REPARTITION:
        origin = repartitioned_from(headers)
        if origin is not None:
            topic, partition, offset, timestamp = origin
            return RecordIn(msg.key, msg.value, headers, topic, partition, offset, timestamp, route.partitions,
                            msg.partition)
    return RecordIn(msg.key, msg.value, headers, msg.topic, msg.partition, msg.offset, msg.timestamp / 1000,
                    route.partitions, None)


def quarantine_stub(route: Route, record: RecordIn, size: int, limit: int, now: float, out: RecordBatches) -> Routed:
    """Quarantine a bounded stub for `record`, whose copy does not fit `limit` with byzguard's headers: it is not
    checked and changes no state (output.too_large), in the quarantine partition of its entity."""
    key, value, headers = too_large_stub(
        record.key, record.value, record.headers, (), route.name, topic=record.topic, partition=record.partition,
        offset=record.offset, timestamp=record.timestamp, size=size, limit=limit, now=now)
    out.add(route.quarantine_topic, record.home, key, value, headers)
    log.warning("%s[%d]@%d: a record of %d bytes does not fit the outputs (limit %d with byzguard's headers); "
                "quarantined as a stub (output.too_large)", record.topic, record.partition, record.offset, size,
                limit)
    return Routed(record, Decision(Outcome.QUARANTINED, (Reason(Code.OUTPUT_TOO_LARGE, f"{size} bytes"),)),
                  None, None, None)


class StageContext:
    """What every stage runner shares with the loop."""

    __slots__ = ("app_id", "bootstrap", "eos", "group", "max_records", "max_seconds", "producer_options")

    def __init__(self, *, app_id: str, bootstrap: str, group: str, eos: bool, producer_options: dict[str, Any],
                 max_records: int, max_seconds: float) -> None:
        self.app_id = app_id
        self.bootstrap = bootstrap
        self.group = group
        self.eos = eos
        self.producer_options = producer_options
        self.max_records = max_records
        self.max_seconds = max_seconds

    async def transactional(self, transactional_id: str, topics: Iterable[str] = ()) -> AIOKafkaProducer:
        """A started transactional producer (its start aborts what a previous owner left open); `topics`: existing
        topics its metadata refreshes ask for (`refreshing_only`)."""
        txn = transactional_producer(self.bootstrap, transactional_id, topics, self.producer_options)
        await txn.start()
        return txn


def transactional_producer(bootstrap: str, transactional_id: str, topics: Iterable[str],
                           options: dict[str, Any]) -> AIOKafkaProducer:
    """A (not started) transactional producer of the runtime's stages: acks=all, idempotent, its metadata
    refreshes asking for `topics` only (`refreshing_only`)."""
    return refreshing_only(AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                            transactional_id=transactional_id, **options), topics)


def refreshing_only(producer: AIOKafkaProducer, topics: Iterable[str]) -> AIOKafkaProducer:
    """`producer`, whose client's metadata refreshes ask for `topics` (which must exist: a Metadata request may
    auto-create what it names) and the topics it sends to. aiokafka's client asks for every topic of the cluster
    while it knows none, and a transactional producer's start refreshes after each refused InitProducerId: after a
    SIGKILL, until the previous owner's transaction is aborted."""
    known = list(dict.fromkeys(topics))
    if known:
        producer.client.set_topics(known)
    return producer


async def commit(txn: AIOKafkaProducer | None, out: RecordBatches, offsets: dict[TopicPartition, int],
                 group: str) -> dict[tuple[str, int], int]:
    """Deliver one batch's records: in one transaction with the input `offsets` (exactly_once, `txn`), or
    delivered and acknowledged (at_least_once: the loop commits the offsets after). Returns the last offset
    written per destination partition; raises if anything was not delivered or the transaction failed."""
    if txn is None:
        return await out.deliver()
    await begin(txn)
    try:
        return await transact(txn, out, offsets, group)
    except BaseException:
        await abort(txn)
        raise


async def begin(txn: AIOKafkaProducer) -> None:
    """Begin a transaction of `txn` (started: it has its producer id) in this turn of the loop. aiokafka's
    begin_transaction first awaits the producer id through a task of its own, which costs two more turns of a busy
    loop (1.8 ms p50, 24 ms p99 at 4,800 ev/s, bench/results/latency-6838a72) before the batch's records can be
    handed to the sender."""
    manager = txn._txn_manager
    if manager.has_pid():
        manager.begin_transaction()
    else:
        await txn.begin_transaction()


async def transact(txn: AIOKafkaProducer, out: RecordBatches, offsets: dict[TopicPartition, int],
                   group: str) -> dict[tuple[str, int], int]:
    """The transaction of one batch (begun, `begin`): its records (`out`: outputs and changelog records) and the input
    offsets of `group`, committed; returns what `RecordBatches.deliver` returns. Raises where any part failed
    (the caller aborts).

    aiokafka's sender takes the transaction's requests one at a time and in a fixed order: AddPartitionsToTxn
    (the produce waits for it), AddOffsetsToTxn, TxnOffsetCommit, EndTxn; it sends EndTxn only once the offsets are
    in, and fails the commit where they failed. The offsets are handed to it once the records are acknowledged:
    a produce sent beside AddOffsetsToTxn is answered ~100 ms late by a broker that verifies transactional
    produce requests (KIP-890; 1.2-1.4% of them at 4,800 ev/s, the largest part of d's p99,
    bench/results/txn-d52d231), and the commit is asked for with them: EndTxn follows TxnOffsetCommit from the
    sender's next turn. Both are handed over by the callback of the last batch's answer (`_hand_over`), not by this
    task once its wait for the records ended: on a busy loop the task's turns between the answer and
    AddOffsetsToTxn took 3.8 ms at p50 and 21 ms at p90 of a transaction at 8,700 ev/s (bench/results/dlat-*).
    The records are waited for: aiokafka would commit a transaction without a batch it failed to deliver."""
    manager = txn._txn_manager
    sent = await out.send()
    handed: asyncio.Future[asyncio.Future[None] | None] = asyncio.get_running_loop().create_future()
    pending = [fut for *_, fut in sent]
    hand = functools.partial(_hand_over, manager, pending, offsets, group, handed)
    if pending:
        for fut in pending:
            fut.add_done_callback(hand)
    else:
        hand()
    try:
        registered = await handed  # None: a batch failed, nothing was handed over (raised just below)
    except BaseException:
        for fut in pending:
            fut.remove_done_callback(hand)
        if handed.done() and not handed.cancelled() and handed.exception() is None:
            _retrieve(handed.result())
        raise
    result = delivered(sent)
    if registered is not None:
        await asyncio.shield(registered)  # refused: aiokafka never sends EndTxn, the commit fails too
    await asyncio.shield(manager.wait_for_transaction_end())
    return result


def _hand_over(manager: Any, pending: list[asyncio.Future[Any]], offsets: dict[TopicPartition, int], group: str,
               handed: asyncio.Future[asyncio.Future[None] | None], _: Any = None) -> None:
    """Once every batch of the transaction is answered (a batch future's callback), and only if all were
    delivered: hand its offsets (AddOffsetsToTxn, TxnOffsetCommit) and its commit (EndTxn) to aiokafka's sender, as
    send_offsets_to_transaction and commit_transaction do before they wait; `handed` gets the offsets' future."""
    if handed.done() or not all(fut.done() for fut in pending):
        return
    if any(fut.cancelled() or fut.exception() is not None for fut in pending):
        handed.set_result(None)
        return
    try:
        registered: asyncio.Future[None] | None = None
        if offsets:
            if not manager.is_in_transaction():
                raise IllegalOperation("Not in the middle of a transaction")
            registered = manager.add_offsets_to_txn(commit_structure_validate(offsets), group)
            _retrieve(registered)  # awaited by `transact`; not reported where the abort already says it
        manager.committing_transaction()  # raises where the transaction already failed
        _retrieve(manager.wait_for_transaction_end())  # refused offsets fail it too: `transact` raises theirs
    except BaseException as exc:
        handed.set_exception(exc)
        return
    handed.set_result(registered)


def _retrieve(fut: asyncio.Future[Any] | None) -> None:
    if fut is not None:
        fut.add_done_callback(_retrieved)


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def abort(txn: AIOKafkaProducer) -> None:
    """Abort a failed transaction (fenced or the broker gone: the next owner's producer aborts it)."""
    try:
        await txn.abort_transaction()
    except Exception as exc:
        log.warning("batched runtime: abort failed: %r", exc)


async def partition_counts(bootstrap: str, topics: Iterable[str]) -> dict[str, int]:
    """The partition count of each topic (what a keyed record's murmur2 partition is taken modulo)."""
    wanted = sorted(set(topics))
    if not wanted:
        return {}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        return {topic: len(await producer.partitions_for(topic)) for topic in wanted}
    finally:
        await producer.stop()


class ForwardStage(Protocol):
    """Maps a record of its `topics` to records of an internal topic (and side outputs), with no state."""

    @property
    def topics(self) -> Sequence[str]:
        """The topics it reads."""
        ...

    @property
    def outputs(self) -> Sequence[str]:
        """The topics it writes (their limits are read at start)."""
        ...

    @property
    def keyed(self) -> Sequence[str]:
        """The outputs whose partition counts it needs (records placed by key as Kafka's partitioner would)."""
        ...

    def configure(self, limits: dict[str, int], partitions: dict[str, int]) -> None:
        """The outputs' max.message.bytes and partition counts, known once the runtime started."""
        ...

    def forward(self, msg: Any, out: RecordBatches, now: float) -> None:
        """Add what one consumed message (aiokafka's) maps to to `out`."""
        ...


class RouteRepartition:
    """A repartitioning route's forward stage (the faust runtime's repartition_events agent): each input record,
    bytes and headers untouched, to the repartition topic at the murmur2 partition of its key, with its input
    coordinates (byzguard_repartitioned_from). A record without a key keeps its partition number (the verify
    stage refuses it: decode.key_mismatch). A record whose copy cannot fit the repartition or quarantine topic is
    accounted for here, as a stub in the quarantine partition of its entity (output.too_large)."""

    def __init__(self, app_id: str, route: Route) -> None:
        self.route = route
        self.target = route_repartition_topic_name(app_id, route)
        self.topics: tuple[str, ...] = tuple(route.inputs)
        self.outputs: tuple[str, ...] = (self.target, route.quarantine_topic)
        self.keyed: tuple[str, ...] = ()
        self.copy_limit = DEFAULT_LIMIT

    def configure(self, limits: dict[str, int], partitions: dict[str, int]) -> None:
        self.copy_limit = min(limits.get(t, DEFAULT_LIMIT) for t in self.outputs)

    def forward(self, msg: Any, out: RecordBatches, now: float) -> None:
        route = self.route
        key = msg.key
        partitions = route.partitions
        partition = partition_for(key, partitions) if key is not None else msg.partition % partitions
        headers = msg.headers or ()
        timestamp = msg.timestamp / 1000  # aiokafka's timestamps are in ms, the header's in seconds
        size = record_size(key, msg.value, headers)
        if size + OWN_HEADERS_MAX > self.copy_limit:
            record = RecordIn(key, msg.value, headers, msg.topic, msg.partition, msg.offset, timestamp, partitions,
                              partition)
            observe(route.name, quarantine_stub(route, record, size, self.copy_limit, now, out), now)
            return
        out.add(self.target, partition, key, msg.value,
                repartition_headers(headers, msg.topic, msg.partition, msg.offset, timestamp))


def repartitions(app_id: str, config: GuardConfig) -> list[RouteRepartition]:
    """The forward stage of every route with `partitioning: repartition`."""
    return [RouteRepartition(app_id, r) for r in config.routes if r.partitioning is Partitioning.REPARTITION]


class Runner(Protocol):
    """What the loop runs for the partitions of some topics (see the module doc)."""

    @property
    def topics(self) -> frozenset[str]:
        """The topics it reads."""
        ...

    async def start(self, producer: AIOKafkaProducer | None) -> None:
        """Before the consumer starts; `producer`: the loop's plain producer (at_least_once) or None."""
        ...

    async def assigned(self, tps: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Open what the new partitions need (restored state, transactional producers); return the input
        offsets the stored state of each already includes (at_least_once resumes from the larger)."""
        ...

    async def revoked(self, tps: set[TopicPartition]) -> None:
        """Close what the revoked partitions had (the loop's lock holds: no batch is in flight)."""
        ...

    async def batch(self, tp: TopicPartition, messages: list[Any], end: int,
                    offsets: dict[TopicPartition, int]) -> None:
        """Run the fetched `messages` of `tp` (in batches), setting `offsets[tp]` to the next offset of each
        batch that is delivered (exactly_once: committed); `end` is the next one after the last batch (past the
        transaction markers that follow the last record). No messages: commit `end` (markers passed)."""
        ...

    async def idle(self) -> None:
        """Punctuations that are due on partitions without a batch."""
        ...

    async def stop(self) -> None:
        """Close everything."""
        ...


class Forwards:
    """The runner of forward stages (see the module doc); a topic several stages read is forwarded by each, in
    one batch."""

    def __init__(self, stages: Sequence[ForwardStage], ctx: StageContext) -> None:
        self.stages = list(stages)
        self.ctx = ctx
        self.by_topic: dict[str, list[ForwardStage]] = {}
        for stage in self.stages:
            for topic in stage.topics:
                self.by_topic.setdefault(topic, []).append(stage)
        self.topics = frozenset(self.by_topic)
        self.producer: AIOKafkaProducer | None = None
        self.txns: dict[TopicPartition, AIOKafkaProducer] = {}

    async def start(self, producer: AIOKafkaProducer | None) -> None:
        self.producer = producer
        outputs = [t for stage in self.stages for t in stage.outputs]
        limits = await load_limits(self.ctx.bootstrap, outputs)
        partitions = await partition_counts(self.ctx.bootstrap, [t for stage in self.stages for t in stage.keyed])
        for stage in self.stages:
            stage.configure(limits, partitions)

    async def assigned(self, tps: set[TopicPartition]) -> dict[TopicPartition, int]:
        if self.ctx.eos:
            for tp in tps:
                if tp not in self.txns:
                    self.txns[tp] = await self.ctx.transactional(
                        f"{self.ctx.app_id}-forward-{tp.topic}-{tp.partition}", [tp.topic])
        return {}

    async def revoked(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            txn = self.txns.pop(tp, None)
            if txn is not None:
                await txn.stop()

    async def batch(self, tp: TopicPartition, messages: list[Any], end: int,
                    offsets: dict[TopicPartition, int]) -> None:
        stages = self.by_topic[tp.topic]
        txn = self.txns[tp] if self.ctx.eos else None
        producer = txn if txn is not None else self.producer
        if not messages:  # only transaction markers or aborted records were passed
            await commit(txn, RecordBatches(producer), {tp: end}, self.ctx.group)
            offsets[tp] = end
        index, count = 0, len(messages)
        while index < count:
            out = RecordBatches(producer)
            started = time.monotonic()
            stop = min(count, index + self.ctx.max_records)
            last = index
            now = time.time()
            while last < stop:
                msg = messages[last]
                for stage in stages:
                    stage.forward(msg, out, now)
                last += 1
                if time.monotonic() - started >= self.ctx.max_seconds:
                    break
            next_offset = messages[last - 1].offset + 1 if last < count else end
            await commit(txn, out, {tp: next_offset}, self.ctx.group)
            offsets[tp] = next_offset
            index = last

    async def idle(self) -> None:
        return None

    async def stop(self) -> None:
        await self.revoked(set(self.txns))


class Stages:
    """Every runner of the loop but the verify stage, dispatched by topic."""

    def __init__(self, runners: Sequence[Runner]) -> None:
        self.runners = [r for r in runners if r.topics]
        self.runner_of = {topic: runner for runner in self.runners for topic in runner.topics}
        self.topics = frozenset(self.runner_of)

    def __bool__(self) -> bool:
        return bool(self.runners)

    async def start(self, producer: AIOKafkaProducer | None) -> None:
        for runner in self.runners:
            await runner.start(producer)

    def _split(self, tps: Iterable[TopicPartition]) -> list[tuple[Runner, set[TopicPartition]]]:
        by_runner: dict[int, tuple[Runner, set[TopicPartition]]] = {}
        for tp in tps:
            runner = self.runner_of[tp.topic]
            by_runner.setdefault(id(runner), (runner, set()))[1].add(tp)
        return list(by_runner.values())

    async def assigned(self, tps: set[TopicPartition]) -> dict[TopicPartition, int]:
        stored: dict[TopicPartition, int] = {}
        for runner, mine in self._split(tps):
            stored.update(await runner.assigned(mine))
        return stored

    async def revoked(self, tps: set[TopicPartition]) -> None:
        for runner, mine in self._split(tps):
            await runner.revoked(mine)

    async def batch(self, tp: TopicPartition, messages: list[Any], end: int,
                    offsets: dict[TopicPartition, int]) -> None:
        await self.runner_of[tp.topic].batch(tp, messages, end, offsets)

    async def idle(self) -> None:
        for runner in self.runners:
            await runner.idle()

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.stop()
