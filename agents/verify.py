"""verify_events: the guard's agent. Reads each record, asks byzguard.guard for its fate, routes it.

Everything a record causes (its own routing, held records it releases, state writes) happens inside the
agent's iteration, under the processing lock. Its records (verified, quarantine, receipts) go into the outbox
(app/outbox.py), which sends them in record batches; its state writes wait in tables/buffer.py. Every commit
first writes the state out and waits until the outbox delivered everything, so with exactly_once all of it
commits in one Kafka transaction with the input offsets.

A route with `partitioning: repartition` puts repartition_events in front: it copies every input record,
bytes and headers untouched, to the internal repartition topic at the partition of its key (Kafka's murmur2,
byzguard.partitioner), with its input coordinates in one header, in the transaction of the input record;
verify_events then reads the repartition topic and judges each record as if it had come from its input.

Sizes are decided before anything is sent: a record whose copy (with byzguard's headers, at most
byzguard.routing OWN_HEADERS_MAX) would not fit the verified or quarantine topic is not checked at all; a bounded
stub that points at it goes to quarantine instead (`output.too_large`), and it changes no state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.types import TP
from mode.supervisors import CrashingSupervisor

from app import eos, metrics
from app.outbox import Outbox, RecordTooLargeError
from byzguard.config import Partitioning, Route
from byzguard.engine import Decision
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, Guard, RecordIn, Result, Routed, held_count
from byzguard.partitioner import partition_for
from byzguard.routing import (
    OWN_HEADERS_MAX,
    receipt,
    receipt_key,
    record_size,
    repartition_headers,
    repartitioned_from,
    too_large_stub,
)
from byzguard.verdict import Code, Outcome, Reason
from tables import RouteTables
from tables.buffer import StateBuffer
from topics import RouteTopics

log = logging.getLogger(__name__)


def attach_verify_agent(app: faust.App, guard: Guard, route: Route, topics: RouteTopics,
                        tables: RouteTables, buffer: StateBuffer) -> Any:
    """Register the verify agent of one route (and its causal deadline ticks) on `app`.

    State is read and written through `buffer` (tables/buffer.py), which the commit flushes.
    """
    by_name: dict[str, Any] = {ENTITIES: tables.state_by_entity, LAMPORTS: tables.lamport_by_source}
    if tables.causal_by_entity is not None:
        by_name[CAUSAL] = tables.causal_by_entity
    state: dict[str, Any] = {name: buffer.reader(table) for name, table in by_name.items()}
    if CAUSAL not in state:
        state[CAUSAL] = {}  # the route holds no early events: the guard never reads or writes the buffer
    verified_topic = topics.verified_topic
    quarantine_topic = topics.quarantine_topic
    receipts_topic = topics.receipts_topic
    tick_topic = topics.ticks_topic
    tick_name = tick_topic.get_topic_name() if tick_topic is not None else None
    name = route.name
    latency = metrics.VERIFY_SECONDS.labels(name)
    held_gauge = metrics.CAUSAL_HELD.labels(name)
    oldest_gauge = metrics.CAUSAL_OLDEST.labels(name)
    # The causal gauges are this worker's partitions' truth: a partition's count is read from its held index
    # (restored with the table) at its first event or deadline tick after an assignment, kept by the deltas
    # in between, and dropped when the partition is revoked.
    causal_reader = state[CAUSAL] if tables.causal_by_entity is not None else None
    held_by_partition: dict[int, int] = {}
    oldest_by_partition: dict[int, float] = {}

    def publish_causal() -> None:
        held_gauge.set(sum(held_by_partition.values()))
        oldest_gauge.set(max(oldest_by_partition.values(), default=0.0))

    def count_held(result: Result, partition: int) -> None:
        assert causal_reader is not None
        before = held_by_partition.get(partition)
        tick = result.oldest_held_age is not None
        count = held_count(causal_reader) if before is None or tick else before + result.held_delta
        if count == before and not tick:
            return
        held_by_partition[partition] = count
        if tick:
            oldest_by_partition[partition] = result.oldest_held_age or 0.0
        elif not count:
            oldest_by_partition[partition] = 0.0  # released: nothing left to be old
        publish_causal()

    if causal_reader is not None:
        partitioned_topics = {*route.inputs, tick_name}
        if topics.repartition_topic is not None:  # the agent reads the repartition topic, co-partitioned too
            partitioned_topics.add(topics.repartition_topic.get_topic_name())

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode's Signal.connect is typed for plain functions; faust awaits async receivers
        async def drop_causal_counts(sender: Any, revoked: Any = (), **kwargs: Any) -> None:
            # Another worker counts them now; if they come back, their count is read from the held index again.
            for tp in revoked or ():
                if tp.topic in partitioned_topics:
                    held_by_partition.pop(tp.partition, None)
                    oldest_by_partition.pop(tp.partition, None)
            publish_causal()

    def apply(result: Result, partition: int) -> None:
        for (table_name, key), value in result.writes.items():
            buffer.put(by_name[table_name], partition, key, value)
        if causal_reader is not None:
            count_held(result, partition)

    outbox = buffer.outbox
    assert outbox is not None, "the verify agent sends through the buffer's outbox"
    add = outbox.add
    verified_name = verified_topic.get_topic_name()
    quarantine_name = quarantine_topic.get_topic_name()
    receipts_name = receipts_topic.get_topic_name() if receipts_topic is not None else None

    copy_limit = 0  # the smaller limit of the verified and quarantine topics, known once the outbox started

    def stub(record: RecordIn, reasons: tuple[Reason, ...], size: int, now: float, source: TP) -> Routed:
        return quarantine_stub(outbox, quarantine_name, name, record, reasons, size, copy_limit, now, source)

    def emit(routed: Routed, source: TP) -> None:
        record = routed.record
        # Outputs keep the partition the record was read from: they are co-partitioned, and no key hashing is
        # needed. Under exactly_once they belong to the transaction of the event being processed (`source`).
        home = record.home
        try:
            if routed.verified_headers is not None:
                add(verified_name, home, record.key, record.value, routed.verified_headers, source=source)
            if routed.quarantine_headers is not None:
                add(quarantine_name, home, record.key, record.value, routed.quarantine_headers, source=source)
        except RecordTooLargeError:
            # Not reached while byzguard's headers stay within OWN_HEADERS_MAX (checked before processing); should
            # that bound ever be wrong, the record is still accounted for, as a stub.
            log.exception("a copy exceeded the bound checked before processing")
            stub(record, routed.decision.reasons, record_size(record.key, record.value, record.headers), time.time(),
                 source)
        if receipts_name is not None and routed.envelope is not None:
            # In the same transaction as the routing: a receipt is visible exactly when the verdict is.
            event_id = routed.envelope.id
            add(receipts_name, home, receipt_key(event_id), receipt(
                event_id, routed.decision.outcome, routed.decision.reasons, name, topic=record.topic,
                partition=record.partition, offset=record.offset, now=time.time()), source=source)

    # The count the guard places records by: that of the topic verify_events reads (the inputs, or the
    # repartition topic), which app.provision has made the route's.
    partitions = route.partitions
    repartitioned = route.partitioning is Partitioning.REPARTITION

    def record_of(msg: Any) -> RecordIn:
        headers = msg.headers or ()
        if repartitioned:
            origin = repartitioned_from(headers)
            if origin is not None:
                topic, partition, offset, timestamp = origin
                return RecordIn(msg.key, msg.value, headers, topic, partition, offset, timestamp, partitions,
                                msg.partition)
        return RecordIn(msg.key, msg.value, headers, msg.topic, msg.partition, msg.offset, msg.timestamp,
                        partitions)

    async def verify_one(event: faust.EventT[Any]) -> None:
        msg = event.message
        started = time.perf_counter()
        now = time.time()
        buffer.partition = msg.partition  # tables are co-partitioned with the inputs (and the ticks)
        if msg.topic == tick_name:
            result = guard.expire_held(route, state, now=now)
        else:
            record = record_of(msg)
            size = record_size(record.key, record.value, record.headers)
            if size + OWN_HEADERS_MAX > copy_limit:  # no copy would fit: not checked, no state, a stub instead
                routed = stub(record, (), size, now, msg.tp)
                latency.observe(time.perf_counter() - started)
                observe(name, routed, now)
                return
            result = guard.process(record, route, state, now=now)
        apply(result, msg.partition)
        source = msg.tp
        for routed in result.routed:
            emit(routed, source)
        if buffer.full:  # write out now, so the commit's flush has only the last few to wait for
            buffer.write_out()
        latency.observe(time.perf_counter() - started)
        for routed in result.routed:
            observe(name, routed, now)

    async def verify_events(stream: faust.StreamT[bytes]) -> None:
        nonlocal copy_limit
        await outbox.start([verified_name, quarantine_name, *([receipts_name] if receipts_name else []),
                            *(table.changelog_topic.get_topic_name() for table in by_name.values())])
        copy_limit = min(outbox.limit(verified_name), outbox.limit(quarantine_name))
        await _each_event(app, stream, outbox, verify_one)

    if tick_topic is not None:
        # At most 5 s apart: the ticks also refresh the buffer gauges of a partition restored or assigned.
        @app.timer(interval=max(0.5, min(5.0, route.causal.deadline / 4)))  # type: ignore[untyped-decorator]  # faust's App.timer is untyped
        async def tick_causal_deadlines() -> None:
            # Expiry must run inside the stream (table writes and sends belong to a partition's
            # transaction), so the timer only sends a tick to each partition this worker owns. Ticks go
            # through the plain producer, outside any transaction: a transaction commits only with input
            # offsets, and on a quiet partition a tick inside one would never become visible. A lost or
            # repeated tick is harmless: expiry is idempotent and the next tick comes soon.
            producer = app.producer
            for tp in app.assignor.assigned_actives():
                if tp.topic == tick_name:
                    await producer.send(tick_name, b"tick", b"", tp.partition, None, None)

    if topics.sources_topic is not None and topics.repartition_topic is not None:
        attach_repartition_agent(app, route, topics.sources_topic, topics.repartition_topic, buffer)
    eos.guard(app, topics.inputs_topic)  # no record of ours is acked unless the agent processed it
    # A crashing verify agent must stop the worker loudly (and let Kafka redeliver to a restarted one),
    # never be restarted silently in a loop or die unnoticed.
    return app.agent(topics.inputs_topic, name=f"verify_events-{name}",
                     supervisor_strategy=CrashingSupervisor)(verify_events)


def quarantine_stub(outbox: Outbox, quarantine_name: str, route: str, record: RecordIn,
                    reasons: tuple[Reason, ...], size: int, limit: int, now: float, source: TP) -> Routed:
    """Quarantine a bounded stub for `record`, whose copy does not fit (see the module doc)."""
    key, value, headers = too_large_stub(
        record.key, record.value, record.headers, reasons, route, topic=record.topic, partition=record.partition,
        offset=record.offset, timestamp=record.timestamp, size=size, limit=limit, now=now)
    outbox.add(quarantine_name, record.home, key, value, headers, source=source)
    log.warning("%s[%d]@%d: a record of %d bytes does not fit the outputs (limit %d with byzguard's headers); "
                "quarantined as a stub (output.too_large)", record.topic, record.partition, record.offset, size, limit)
    reason = Reason(Code.OUTPUT_TOO_LARGE, f"{size} bytes")
    return Routed(record, Decision(Outcome.QUARANTINED, (reason, *reasons)), None, None, None)


def attach_repartition_agent(app: faust.App, route: Route, sources: faust.TopicT, repartition: faust.TopicT,
                             buffer: StateBuffer) -> Any:
    """Register repartition_events of one route: each input record to the partition of its key, unchanged.

    A record without a key keeps its partition number: the verify agent refuses it (decode.key_mismatch).
    """
    outbox = buffer.outbox
    assert outbox is not None, "the repartition agent sends through the buffer's outbox"
    add = outbox.add
    target = repartition.get_topic_name()
    partitions = route.partitions

    quarantine_name = route.quarantine_topic
    copy_limit = 0  # the smaller limit of the repartition and quarantine topics, known once the outbox started

    async def forward_one(event: faust.EventT[Any]) -> None:
        msg: Any = event.message
        key = msg.key
        partition = partition_for(key, partitions) if key is not None else msg.partition % partitions
        headers = msg.headers or ()
        size = record_size(key, msg.value, headers)
        if size + OWN_HEADERS_MAX > copy_limit:
            # A record the broker took compressed may not fit uncompressed: it is accounted for here, as a stub in
            # the quarantine partition of its entity, since no copy of it can reach the verify agent.
            record = RecordIn(key, msg.value, headers, msg.topic, msg.partition, msg.offset, msg.timestamp,
                              partitions, partition)
            observe(route.name, quarantine_stub(outbox, quarantine_name, route.name, record, (), size, copy_limit,
                                                time.time(), msg.tp), time.time())
            return
        # In the input record's transaction: the copy and the input offset commit together (app/eos.py).
        add(target, partition, key, msg.value,
            repartition_headers(headers, msg.topic, msg.partition, msg.offset, msg.timestamp), source=msg.tp)

    async def repartition_events(stream: faust.StreamT[bytes]) -> None:
        nonlocal copy_limit
        await outbox.start([target, quarantine_name])
        copy_limit = min(outbox.limit(target), outbox.limit(quarantine_name))
        await _each_event(app, stream, outbox, forward_one)

    eos.guard(app, sources)
    return app.agent(sources, name=f"repartition_events-{route.name}",
                     supervisor_strategy=CrashingSupervisor)(repartition_events)


async def _each_event(app: faust.App, stream: faust.StreamT[bytes], outbox: Outbox,
                      handle: Callable[[faust.EventT[Any]], Awaitable[None]]) -> None:
    """An agent's loop: `handle` each record, and let the outbox send what it has when it is time."""
    await outbox.start()
    idle = _idle(stream)
    async for event in stream.events():
        # Each record once, in order, its state writes, outputs and ack with no commit in between (app/eos.py).
        await eos.process(app, event, handle)
        # Batches go when full, when a record lingered, or when nothing else is waiting to be processed.
        if outbox.pending and (outbox.due() or idle()):
            await outbox.wake()


def _idle(stream: faust.StreamT[bytes]) -> Callable[[], bool]:
    """`idle()`: True when no record is waiting in the agent's input queue (the agent is about to wait)."""
    queue = getattr(getattr(stream, "channel", None), "queue", None)
    empty = getattr(queue, "empty", None)
    if empty is None:  # not a faust channel: treat every event as the last of its batch
        return lambda: True
    checked: Callable[[], bool] = empty
    return checked


#: Metric children by label values (prometheus_client's labels() costs microseconds per call, per event).
_EVENTS: dict[tuple[str, str, str], Any] = {}
_DATA_AGE: dict[tuple[str, str], Any] = {}


def observe(route: str, routed: Routed, now: float) -> None:
    """Count one routed record in the metrics."""
    decision = routed.decision
    env = routed.envelope
    event_type = metrics.type_label(route, env.type) if env is not None else metrics.UNKNOWN
    labels = (route, event_type, decision.outcome.value)
    events = _EVENTS.get(labels)
    if events is None:
        events = _EVENTS[labels] = metrics.EVENTS.labels(*labels)
    events.inc()
    if decision.reasons:
        source = metrics.source_label(env.source) if env is not None else metrics.UNKNOWN
        for reason in decision.reasons:
            metrics.CHECK_FAILURES.labels(route, reason.check, reason.code.value, reason.severity.value,
                                          source).inc()
            if reason.code is Code.VERSION_REGRESSION:
                metrics.VERSION_REGRESSIONS.labels(route, event_type).inc()
    if env is not None and env.time is not None and decision.outcome is not Outcome.DUPLICATE:
        age = _DATA_AGE.get((route, event_type))
        if age is None:
            age = _DATA_AGE[(route, event_type)] = metrics.DATA_AGE.labels(route, event_type)
        age.observe(max(0.0, now - env.time))
