"""The batched runtime: every route's verify stream in one loop on aiokafka's consumer (the only runtime).

One AIOKafkaConsumer (group `<app_id>-verify`, see `verify_group`) reads whole fetches of every route's inputs
(`getmany`). The records of one input partition form batches of at most `batch_max_records` records and
`batch_max_ms` of processing; the records go through the processor seam (byzguard.processor `VerifyProcessor`:
`Guard.process_batch`, up to PREPARED_RECORDS records at a time, in passes over them with the decisions of one by
one), reading their state through the batch's pending writes, then those of the batch in flight, then
RocksDB (app/runtime/state.py: faust's layout and paths). After each batch of a route partition the causal
deadlines are checked (its `punctuate`: `Guard.expire_held`), and on a timer when it is idle.

A batch, once processed, goes in flight (`_launch`): its writes are sealed (PartitionState.seal) and stay readable
under the pending writes of the batch being built, and its delivery runs in a task (`_fly`) while the loop fetches
and processes the next steps. What the partition's next steps process while its batch in flight has not let the
next one go waits as one batch (`_Waiting`: its writes pending, its outputs collected), which goes in flight from
the task of the batch before it (`_release`): under exactly_once once that one is stored (one batch in flight per
route partition), under at_least_once once its outputs are delivered and the batch before it is stored (at most
two in flight: the newer one's outputs travel beside the older one's changelog, which halved c's median latency at
a paced load, bench/results/latency-6e61a94; with BYZGUARD_BATCH_OVERLAP=false once that one is stored). The
partitions do not wait for each other; a waiting batch of `batch_max_records` records makes the loop wait (it
fetches no further ahead), and after a step whose batches all wait the loop fetches again once a batch in flight
let the next go (`_paced`). So outputs, changelog records, transactions and stores keep the order of the steps.
The loop fetches at most once per `step_interval_ms` (BYZGUARD_STEP_INTERVAL_MS) while its input comes at
PACE_RECORDS records per interval or more: at a paced load, steps taken as fast as the loop can go hold a few
records per partition each, and their per-step work (fetch and produce requests, flights, RocksDB writes) takes all
its idle time; below that rate a record fetched at once does not wait for the interval.

at_least_once, per batch: the outputs are sent and delivered, then the changelog records, then the state and the
partition's next input offset go to RocksDB in the same WriteBatch, then the offsets are committed behind the loop
(one commit in flight, one per `commit_interval` at most, BYZGUARD_COMMIT_INTERVAL; offsets stored meanwhile go in
the next). A record is repeated after a crash at most, never lost: on assignment the state is brought to the
changelog's end and the input resumes at the larger of the committed and the stored offset. On a wiped data dir only
the committed offset is left: the records after it (up to a commit interval's worth, and the commit in flight) run
again against a state that already holds them.

exactly_once, per batch: one transaction of the route partition's transactional producer (id
`<app_id>-batched-<route>-<partition>`, which fences a zombie owner) holds the outputs, the changelog records and
the input offsets (`send_offsets_to_transaction`); RocksDB is written only once it committed. The waiting batch's
transaction begins only once it committed; where it fails, it is aborted, its writes and those of the waiting batch
(built on them) are discarded, that batch is never sent, and the worker stops (`fail`). On assignment the producer
is started first (aborting what a previous owner left open), then the state is restored from the changelogs,
read_committed, to their end: the changelog's end is the truth.

Rebalances go through aiokafka's public ConsumerRebalanceListener. On revoke the step in progress finishes and every
batch in flight or waiting lands (its transaction commits or aborts) and its offsets are committed before the
partitions go, and their databases are closed; on assign the databases are opened and restored before the first
record of the partition is processed.

The topics that are not a route's verify input go to the loop's other stages (app/runtime/stages.py), read by the
same consumer: the forward stage of a route with `partitioning: repartition` (its verify stage reads the repartition
topic) and the cross-stream audits' forward and join stages (app/runtime/audits.py).

faust keeps the App, its web server, CLI and timers; its consumer (group `<app_id>`) reads none of the routes'
topics (the review and decision streams are side consumers, app/review/store.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError
from mode import Service

from app import metrics
from app.runtime import membership
from app.runtime.audits import audit_stages
from app.runtime.batches import RecordBatches
from app.runtime.limits import DEFAULT_LIMIT, load_limits
from app.runtime.stages import (
    Forwards,
    StageContext,
    Stages,
    abort,
    begin,
    quarantine_stub,
    record_in,
    repartitions,
    transact,
    transactional_producer,
    verify_topics,
)
from app.runtime.state import PartitionState, changelog_topic, restore, state_names
from app.runtime.tally import Tally
from byzguard.config import GuardConfig, Route
from byzguard.guard import CAUSAL, Guard, RecordIn, Result, Routed, held_count
from byzguard.processor import VerifyProcessor, causal_interval
from byzguard.routing import OWN_HEADERS_MAX, receipt, receipt_key, record_size

log = logging.getLogger(__name__)

#: One route partition: (route name, partition).
Key = tuple[str, int]
#: The largest record batch the runtime's producers build (below a topic's max.message.bytes, which bounds it
#: further). aiokafka sends one batch per partition per request and one request per broker at a time: with
#: faust's 16 KiB a batch of 1,000 outputs went out in some 50 round trips one after another. Not above the
#: review store's fetch size per partition (app/review/store.py SCAN_FETCH_BYTES): a broker returns a whole
#: record batch even where it is larger than the fetch asked for, and the store bounds its memory by it.
BATCH_BYTES = 256 * 1024
#: A step whose newest fetched record is older than this (its timestamp to now, ms) also takes what the broker has
#: received since (`BatchedRuntime._fetch`).
STALE_MS = 5.0
#: While batches are in flight, the loop gives way to them after this much processing (s): each transaction is
#: several round trips one after another, and each waits for the loop to turn.
TURN_S = 0.002
#: The step interval binds only while the input comes at this many records per interval or more (1,600 a second at
#: the default 10 ms), reckoned over RATE_WINDOW_S: below it a step's per-step work (its fetch and produce requests,
#: flights, RocksDB writes) costs little in all, and a record fetched at once does not wait for the interval
#: (`BatchedRuntime._run`; c at 1,000 ev/s: p50 9.3 ms with the interval, 6.0 without, tail-9802ec2).
PACE_RECORDS = 16
RATE_WINDOW_S = 0.1
#: Records processed together (`_process`: Guard.process_batch, each step one pass over them). 64 took
#: ~25% less CPU per record than one at a time (bench/results/core-*/glue.py of issue 21; 256 about the same), and
#: 64 records (~1.5 ms) keep the loop's turns (TURN_S) and batch_max_ms checks about as often as before.
PREPARED_RECORDS = 64
#: ... and at most about this many value bytes (large records: their decoded envelopes are alive together).
PREPARED_BYTES = 128 * 1024


def verify_group(app_id: str) -> str:
    """The consumer group of the batched runtime: it commits the routes' input offsets. faust's own consumer
    (group `app_id`, faust's assignor; the faust agent runtime of earlier releases committed there) reads none of
    them; one group cannot hold both assignors."""
    return f"{app_id}-verify"


def transactional_id(app_id: str, route: str, partition: int) -> str:
    """The transactional id of one route partition under exactly_once (fences its previous owner)."""
    return f"{app_id}-batched-{route}-{partition}"


class _Waiting:
    """The batch of a route partition processed while the batch before it is in flight: its writes stay pending,
    its outputs in `out`; the partition's next batches join it until that one lands (`BatchedRuntime._finish`)."""

    __slots__ = ("offsets", "out", "records")

    def __init__(self, out: RecordBatches) -> None:
        self.out = out
        self.offsets: dict[TopicPartition, int] = {}
        self.records = 0


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runtime: BatchedRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            await self.runtime.revoked(set(revoked))
        except Exception as exc:  # aiokafka would log it and go on with partitions in an unknown state
            await self.runtime.fail(exc)
            raise

    async def on_partitions_assigned(self, assigned: Any) -> None:
        try:
            await self.runtime.assigned(set(assigned))
        except Exception as exc:
            await self.runtime.fail(exc)
            raise


class BatchedRuntime(Service):
    """The verify streams of every route (see the module doc); a mode Service started with the faust App."""

    def __init__(self, *, app_id: str, bootstrap: str, config: GuardConfig, guard: Guard, tabledir: Path,
                 store_options: dict[str, Any], guarantee: str, batch_max_records: int, batch_max_ms: float,
                 session_timeout: float, fetch_min_bytes: int, fetch_max_wait_ms: int, producer: dict[str, Any],
                 assignor: Any = RangePartitionAssignor, data_dir: Path | None = None, worker_id: str | None = None,
                 batch_overlap: bool = True, commit_interval: float = 0.0, step_interval_ms: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        producer = dict(producer)  # on_start sets its batch size (the stages' producers share it)
        self.app_id = app_id
        self.group = verify_group(app_id)
        self.bootstrap = bootstrap
        self.config = config
        self.guard = guard
        self.tabledir = tabledir
        #: Its consumer's client id, the same for every process of its name or on its data dir (membership.py).
        self.client_id = membership.client_id(data_dir or tabledir, worker_id)
        self.named = bool(worker_id)
        self.store_options = store_options
        self.eos = guarantee == "exactly_once"
        #: at_least_once with `batch_overlap`: up to two batches of a route partition in flight (`_release`).
        self.stacked = batch_overlap and not self.eos
        self.max_records = batch_max_records
        self.max_seconds = batch_max_ms / 1000
        self.session_timeout = session_timeout
        self.fetch_min_bytes = fetch_min_bytes
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.producer_options = producer
        #: The group's range assignor (app/runtime/owners.py `OwnersAssignor` also says who owns what).
        self.assignor = assignor
        self.routes = {route.name: route for route in config.routes}
        self.route_of = {topic: route for route in config.routes for topic in verify_topics(app_id, route)}
        self.changelogs = {route.name: {name: changelog_topic(app_id, route, name) for name in state_names(route)}
                           for route in config.routes}
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        #: Open state and (exactly_once) transactional producer of each route partition this worker owns.
        self.parts: dict[Key, PartitionState] = {}
        self.processors: dict[Key, VerifyProcessor] = {}
        self.txns: dict[Key, AIOKafkaProducer] = {}
        #: Input partitions owned, and the next offset to process of each.
        self.positions: dict[TopicPartition, int] = {}
        #: Per input partition of the fetch in progress, the next offset once its records are done.
        self.ends: dict[TopicPartition, int] = {}
        self.last_batch: dict[Key, float] = {}
        #: The causal buffer of each route partition: events held, and the age of the oldest (the gauges).
        self.held: dict[Key, int] = {}
        self.oldest: dict[Key, float] = {}
        self.copy_limit = 0
        self._lock = asyncio.Lock()
        #: The batch in flight of each route partition (`_finish`): delivered (its transaction committed) and
        #: stored while the next one is processed. A failed one stays here: the next batch's `_finish` raises.
        self.flights: dict[Key, asyncio.Future[None]] = {}
        #: Per route partition, done once its newest batch in flight lets the next one go in flight (`_release`):
        #: at_least_once once its outputs are delivered and the batch before it is stored, exactly_once once it
        #: is stored.
        self.fronts: dict[Key, asyncio.Future[None]] = {}
        #: The batch of each route partition processed while its batch before is in flight (`_finish`).
        self.waiting: dict[Key, _Waiting] = {}
        #: The route partitions whose records are being processed (the loop gives way during it: `TURN_S`).
        self._building: set[Key] = set()
        #: at_least_once: the offset commit in flight (`_commit`), and the offsets stored since it was issued.
        self._committing: asyncio.Future[None] | None = None
        self._to_commit: dict[TopicPartition, int] = {}
        #: at_least_once: at most one offset commit per this many seconds (0: one right after the other); when the
        #: next may go, and, set by a revoke or a stop (`_committed`), that the next goes at once.
        self.commit_interval = commit_interval
        self._commit_due = 0.0
        self._commit_now = asyncio.Event()
        self._stopping = False
        self._failed = False
        #: Whether the loop's step put a batch in flight, and whether one of its batches waits (if only that: `_paced`).
        self._launched = self._waited = False
        self._failing: asyncio.Future[None] | None = None
        self._first_assignment = asyncio.Event()
        self._lag_due = 0.0
        #: The loop fetches at most once per this many seconds (`_run`) while its input comes at PACE_RECORDS
        #: records per interval or more, and when it may next; the records fetched since `_rate_since`.
        self.step_interval = step_interval_ms / 1000
        self._step_due = 0.0
        self._pacing = True
        self._rate_records = 0
        self._rate_since = time.monotonic()
        #: The per-record metrics of the batch in progress, added to prometheus when it is finished.
        self.tally = Tally(route.name for route in config.routes)
        for route in config.routes:  # the causal gauges of every route exist (0) from the start, as on faust
            self._publish_causal(route.name)
        self._lag_labels: set[tuple[str, str]] = set()
        self._causal_interval = min((i for i in map(causal_interval, config.routes) if i is not None), default=None)
        # The stages that feed the verify stage or read its outputs (app/runtime/stages.py, audits.py).
        ctx = StageContext(app_id=app_id, bootstrap=bootstrap, group=self.group, eos=self.eos,
                           producer_options=producer, max_records=batch_max_records,
                           max_seconds=self.max_seconds)
        forwards, joins = audit_stages(config, ctx, tabledir, store_options)
        self.stages = Stages([Forwards([*repartitions(app_id, config), *forwards], ctx), joins])

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def on_start(self) -> None:
        routes = self.config.routes
        outputs = [t for r in routes for t in (r.verified_topic, r.quarantine_topic)]
        limits = await load_limits(self.bootstrap, outputs)
        self.copy_limit = min((limits.get(t, DEFAULT_LIMIT) for t in outputs), default=DEFAULT_LIMIT)
        batch = self.producer_options.get("max_batch_size", 16384)
        self.producer_options["max_batch_size"] = max(batch, min(BATCH_BYTES, self.copy_limit))
        if not self.eos:
            self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                             **self.producer_options)
            await self.producer.start()
        await self.stages.start(self.producer)
        # A previous process of this worker (data dir or name) that never left the group holds its partitions until
        # its session times out: removed once this one's join is pending (app/runtime/membership.py).
        url = getattr(getattr(self.assignor, "directory", None), "url", None)
        takeover = membership.Takeover(self.bootstrap, self.group, self.client_id, url=url, named=self.named)
        faust_group = membership.Takeover(self.bootstrap, self.app_id, self.client_id,
                                          join_wait=membership.FAUST_JOIN_WAIT)
        await membership.find_previous(takeover, faust_group)
        self.add_future(faust_group.run())  # faust's consumer joins once this service started
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False, client_id=self.client_id,
            # read_committed under both guarantees: the records of a transaction its producer aborted are void and
            # must never be verified (under at_least_once too: they would also make the real next version conflict).
            auto_offset_reset="earliest", isolation_level="read_committed",
            partition_assignment_strategy=(self.assignor,),  # a range assignor: a route's inputs stay co-partitioned
            session_timeout_ms=int(self.session_timeout * 1000),
            heartbeat_interval_ms=int(self.session_timeout * 100), fetch_min_bytes=self.fetch_min_bytes,
            fetch_max_wait_ms=self.fetch_max_wait_ms, max_poll_records=self.max_records)
        await self.consumer.start()
        self.consumer.subscribe(sorted({*self.route_of, *self.stages.topics}), listener=_Listener(self))
        await takeover.run()
        log.info("batched runtime: %s, group %s, batches of at most %d records / %.0f ms, routes %s",
                 "exactly_once" if self.eos else "at_least_once", self.group, self.max_records,
                 self.max_seconds * 1000, ", ".join(self.routes))
        # The worker says it is ready once it owns its partitions (restored), as faust's agents do.
        try:
            await asyncio.wait_for(self._first_assignment.wait(), timeout=3 * self.session_timeout)
        except TimeoutError:
            log.warning("batched runtime: no partition assignment after %.0f s; going on",
                        3 * self.session_timeout)

    async def on_stop(self) -> None:
        self._stopping = True
        async with self._lock:  # the batch in progress finishes first, then those in flight
            with contextlib.suppress(Exception):  # logged where it failed; the worker stops anyway
                await self._landed_all()
            consumer, self.consumer = self.consumer, None
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await self._committed()
        # Outside the lock: aiokafka's stop first lets a join in progress end, and that calls the rebalance listener,
        # which takes the lock (held here, a worker stopped while it joined the group waited for itself forever).
        if consumer is not None:
            await consumer.stop()
        async with self._lock:
            await self._close(list(self.parts))
            await self.stages.stop()
            if self.producer is not None:
                await self.producer.stop()

    @Service.task
    async def _run(self) -> None:
        try:
            while not self._stopping:
                wait = self._step_due - time.monotonic()
                if wait > 0 and self._pacing:  # fewer, larger steps under load: their work leaves the loop slack
                    await asyncio.sleep(wait)
                    continue  # a stop may have begun meanwhile (and taken the consumer)
                consumer = self.consumer
                if consumer is None:
                    await asyncio.sleep(0.05)
                    continue
                self._step_due = time.monotonic() + self.step_interval
                fetched = await self._fetch(consumer)
                self._count(fetched)
                async with self._lock:
                    if self._stopping:
                        break
                    self._launched = self._waited = False
                    if fetched:
                        await self._step(fetched)
                    if self._causal_interval is not None:
                        await self._punctuate_idle()
                    if self.stages:
                        await self.stages.idle()
                    if not fetched or time.monotonic() >= self._lag_due:
                        await self._pass_markers(consumer)
                    if time.monotonic() >= self._lag_due:
                        self._measure_lag(consumer)
                if self._waited and not self._launched:
                    await self._paced()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self.fail(exc)

    def _count(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        """Whether the step interval binds: the input of the last RATE_WINDOW_S came at PACE_RECORDS records per
        interval or more. Below it the worker is nearly idle and the next fetch goes right after the step (steps of
        a few records each, as many as the records' arrivals make); above it at most one step per interval."""
        self._rate_records += sum(map(len, fetched.values()))
        elapsed = time.monotonic() - self._rate_since
        if elapsed >= RATE_WINDOW_S:
            self._pacing = self._rate_records * self.step_interval >= PACE_RECORDS * elapsed
            self._rate_records, self._rate_since = 0, self._rate_since + elapsed

    async def _fetch(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, list[Any]]:
        """The records of the next step: what aiokafka holds, and what reached the broker since it fetched that.

        aiokafka fetches again as soon as its buffer is drained, gets the few records that arrived since, and
        holds them until the next getmany: under a steady load those are a step old, and the records that came
        during the step wait for one more. So where the newest record held is older than `STALE_MS`, what the
        broker has now is asked for too (waiting at most the fetch's max wait) and runs in the same step."""
        # Up to a batch of every partition owned: aiokafka fills max_records from one partition's fetch before it
        # takes the next one's, so a bound of one batch would run one partition at a time, its delivery round
        # trips not overlapped with the others'.
        budget = self.max_records * max(1, len(self.positions))
        fetched: dict[TopicPartition, list[Any]] = await consumer.getmany(timeout_ms=200, max_records=budget)
        if not fetched or self._stopping:  # a stop began during the wait: aiokafka refuses calls once it stops
            return fetched
        count = sum(map(len, fetched.values()))
        newest = max(messages[-1].timestamp for messages in fetched.values() if messages)
        if count < budget and time.time() * 1000 - newest > STALE_MS:
            more = await consumer.getmany(timeout_ms=self.fetch_max_wait_ms, max_records=budget - count)
            for tp, messages in more.items():
                if tp in fetched:
                    fetched[tp] = [*fetched[tp], *messages]
                else:
                    fetched[tp] = messages
        return fetched

    async def _paced(self) -> None:
        """After a step whose batches all wait for the batches in flight, the next fetch waits until one of those
        lands (their deliveries are all that would move): no loop spinning over steps of a record or two, whose
        work would delay the deliveries' own callbacks on a busy worker."""
        flights = [f for f in (*self.flights.values(), *self.fronts.values()) if not f.done()]
        if flights:
            await asyncio.wait(flights, return_when=asyncio.FIRST_COMPLETED)

    async def fail(self, exc: BaseException) -> None:
        """Nothing past the failed batch is committed; the worker stops loudly and Kafka redelivers."""
        self._stopping = True
        if self._failed:  # a failed batch in flight is reported by its own callback and by the next batch's wait
            return
        self._failed = True
        log.critical("batched runtime: %r; the worker stops", exc, exc_info=exc)
        await self.crash(exc)

    def _measure_lag(self, consumer: AIOKafkaConsumer) -> None:
        """byzguard_consumer_lag_messages of every input partition this worker owns: the records after the last
        one processed (its batches commit right after they are processed)."""
        self._lag_due = time.monotonic() + metrics.LAG_INTERVAL
        seen = set()
        for tp, position in self.positions.items():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            labels = (tp.topic, str(tp.partition))
            metrics.CONSUMER_LAG.labels(*labels).set(max(0, highwater - position))
            seen.add(labels)
        for labels in self._lag_labels - seen:  # revoked: another worker reports them now
            metrics.CONSUMER_LAG.remove(*labels)
        self._lag_labels = seen

    # -- rebalances --------------------------------------------------------------------------------------------

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:  # the batch in progress finished; those in flight are stored and committed
            await self._landed_all()
            await self._committed()
            for tp in revoked:
                self.positions.pop(tp, None)
                self.ends.pop(tp, None)
            await self.stages.revoked({tp for tp in revoked if tp.topic in self.stages.topics})
            owned = {self._key(tp) for tp in self.positions if tp.topic in self.route_of}
            gone = [key for key in self.parts if key not in owned]
            await self._close(gone)
            if gone:
                log.info("batched runtime: revoked %d route partitions", len(gone))

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        if self._stopping:  # a join that ends during the stop: nothing is opened, the consumer leaves the group
            return
        async with self._lock:
            consumer = self.consumer
            if consumer is None or self._stopping:
                return
            new: dict[Key, list[TopicPartition]] = defaultdict(list)
            staged = {tp for tp in assigned if tp not in self.positions and tp.topic in self.stages.topics}
            for tp in assigned:
                if tp not in self.positions and tp.topic in self.route_of:
                    new[self._key(tp)].append(tp)
            opened: list[Key] = []
            starting = []
            for key in new:
                if key in self.parts:
                    continue
                route = self.routes[key[0]]
                if self.eos:  # fence the previous owner (its open transaction is aborted) before reading state
                    txn = transactional_producer(self.bootstrap, transactional_id(self.app_id, *key), route.inputs,
                                                 self.producer_options)
                    starting.append(txn.start())
                    self.txns[key] = txn
                self.parts[key] = PartitionState(self.tabledir, route, key[1], self.store_options)
                self.processors[key] = VerifyProcessor(self.guard, route)
                opened.append(key)
            await asyncio.gather(*starting)  # each fences its previous owner: concurrently, not one after another
            await restore(self.bootstrap, [(self.parts[key], self.changelogs[key[0]]) for key in opened])
            for key in opened:
                if self.routes[key[0]].causal.buffer:  # what the restored buffer holds counts from now on
                    self.held[key] = held_count(self.parts[key].readers[CAUSAL])
                    self._publish_causal(key[0])
            stored_of = await self.stages.assigned(staged)
            for key, tps in new.items():
                stored = self.parts[key].input_offsets()
                stored_of.update((tp, stored[tp.topic]) for tp in tps if tp.topic in stored)
            fallback = None
            every = [*staged, *(tp for tps in new.values() for tp in tps)]
            for tp in every:
                committed = await consumer.committed(tp)
                if committed is None and tp not in stored_of:
                    # Never run on this runtime: resume where the faust runtime (group app_id) committed.
                    if fallback is None:
                        fallback = await _committed_of(self.bootstrap, self.app_id, every)
                    committed = fallback.get(tp)
                start = committed
                if not self.eos and tp in stored_of:
                    start = max(committed or 0, stored_of[tp])
                if start is not None:
                    consumer.seek(tp, start)
                self.positions[tp] = start or 0
            if new:
                log.info("batched runtime: assigned %s", ", ".join(f"{r}[{p}]" for r, p in sorted(new)))
        self._first_assignment.set()

    def readable(self, key: Key) -> PartitionState | None:
        """The state of a route partition this worker owns and has restored; None while it is not owned, being
        restored (assigned: its state is open, its inputs not running yet) or being revoked."""
        part = self.parts.get(key)
        if part is None or not any(self._key(tp) == key for tp in self.positions if tp.topic in self.route_of):
            return None
        return part

    def _key(self, tp: TopicPartition) -> Key:
        return self.route_of[tp.topic].name, tp.partition

    async def _close(self, keys: Iterable[Key]) -> None:
        for key in keys:
            part = self.parts.pop(key, None)
            if part is not None:
                part.close()
            self.processors.pop(key, None)
            self.waiting.pop(key, None)
            self.fronts.pop(key, None)
            self.last_batch.pop(key, None)
            if self.held.pop(key, None) is not None:
                self.oldest.pop(key, None)
                self._publish_causal(key[0])
            txn = self.txns.pop(key, None)
            if txn is not None:
                await txn.stop()

    # -- batches -----------------------------------------------------------------------------------------------

    async def _step(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        """One fetch: every route partition's batches, concurrently (each put in flight by `_finish`); the stages'
        batches are delivered within the step (at_least_once: their offsets committed behind it)."""
        consumer = self.consumer
        assert consumer is not None
        by_key: dict[Key, list[tuple[TopicPartition, list[Any]]]] = defaultdict(list)
        staged: list[tuple[TopicPartition, list[Any]]] = []
        for tp, messages in fetched.items():
            position = self.positions.get(tp)
            if position is None:
                continue  # revoked while the fetch was waiting
            if messages and messages[0].offset < position:
                messages = [m for m in messages if m.offset >= position]
            if messages:
                # The next offset once all of them are done: past the commit markers that follow them on a topic
                # written in transactions (the repartition topics, verified topics), else the group would lag
                # by a marker forever.
                self.ends[tp] = max(messages[-1].offset + 1, await _position(consumer, tp))
                if tp.topic in self.route_of:
                    by_key[self._key(tp)].append((tp, messages))
                else:
                    staged.append((tp, messages))
        offsets: dict[TopicPartition, int] = {}
        # Where one fails, the others finish their part first (their batches in flight or waiting, which a stop
        # then waits for): none goes in flight behind the stop's back.
        done = await asyncio.gather(*(self._partition(key, items) for key, items in by_key.items()),
                                    *(self.stages.batch(tp, messages, self.ends[tp], offsets)
                                      for tp, messages in staged), return_exceptions=True)
        for result in done:
            if isinstance(result, BaseException):
                raise result
        for tp, _ in staged:
            if tp in offsets and tp in self.positions:
                self.positions[tp] = offsets[tp]
        if offsets and not self.eos:  # the stages' offsets (the verify batches' go with their flights)
            self._commit(consumer, offsets)

    async def _partition(self, key: Key, items: list[tuple[TopicPartition, list[Any]]]) -> None:
        part = self.parts[key]
        processor = self.processors[key]
        route = self.routes[key[0]]
        for tp, messages in items:
            index, count = 0, len(messages)
            while index < count:
                out = self._batches(key)
                started = turned = time.monotonic()
                end = min(count, index + self.max_records)
                last = index
                self._building.add(key)  # its batch in flight does not launch the waiting one meanwhile
                while last < end:
                    step, size = last + 1, len(messages[last].value or b"")
                    while step < end and step - last < PREPARED_RECORDS and size < PREPARED_BYTES:
                        size += len(messages[step].value or b"")
                        step += 1
                    self._process(route, processor, part, messages[last:step], out)
                    last = step
                    now = time.monotonic()
                    if now - started >= self.max_seconds:
                        break
                    if now - turned >= TURN_S and self.flights:
                        await asyncio.sleep(0)  # the deliveries in flight go on (their next request, their store)
                        turned = time.monotonic()
                self._building.discard(key)
                next_offset = messages[last - 1].offset + 1 if last < count else self.ends[tp]
                await self._finish(key, route, part, out, {tp: next_offset}, last - index)
                self.positions[tp] = next_offset
                index = last

    async def _pass_markers(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the input partitions whose position moved past what was processed without a record: a fetch
        that brought only transaction markers or aborted records (e.g. the commit marker that ends a partition).
        Without it the group's offset stays before the marker, and its lag at 1, until the next record."""
        moved: dict[Key, dict[TopicPartition, int]] = defaultdict(dict)
        staged: list[tuple[TopicPartition, int]] = []
        for tp, processed in list(self.positions.items()):
            position = await _position(consumer, tp)
            if position > processed:
                if tp.topic in self.route_of:
                    moved[self._key(tp)][tp] = position
                else:
                    staged.append((tp, position))
        offsets: dict[TopicPartition, int] = {}
        for tp, position in staged:  # a stage's input: a batch without records, in its stage's transaction
            await self.stages.batch(tp, [], position, offsets)
            self.positions[tp] = position
        for key, passed in moved.items():
            await self._finish(key, self.routes[key[0]], self.parts[key], self._batches(key), passed)
            self.positions.update(passed)
        if offsets and not self.eos:
            self._commit(consumer, offsets)

    def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        """at_least_once: commit `offsets` (their batches are stored) behind the loop, while the next steps run.
        At most one commit is in flight, so they reach the group in order, and one per `commit_interval` at most;
        offsets stored meanwhile go together in the next one. A revoke and a stop commit what is left at once and
        wait for it. A commit lost to a crash costs nothing: the worker resumes from the offsets stored with the
        state (on a wiped data dir, from the committed ones: the records after them run again)."""
        self._to_commit.update(offsets)
        if self._committing is None:
            self._committing = asyncio.ensure_future(self._commit_stored(consumer))
            self._committing.add_done_callback(self._flown)

    async def _commit_stored(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while self._to_commit:
                delay = self._commit_due - time.monotonic()
                if delay > 0 and not self._commit_now.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._commit_now.wait(), delay)
                offsets, self._to_commit = self._to_commit, {}
                self._commit_due = time.monotonic() + self.commit_interval
                await _commit(consumer, offsets)
        finally:
            self._committing = None

    async def _committed(self) -> None:
        """Commit what is stored at once (not at the next interval), and wait for the commits in flight (their
        error, other than a rebalance's, stops the worker)."""
        self._commit_now.set()
        try:
            while self._committing is not None:
                await asyncio.shield(self._committing)
        finally:
            self._commit_now.clear()

    async def _landed(self, key: Key) -> None:
        """Wait for the batches in flight of `key` (the one waiting goes in flight when the one before lands):
        delivered and stored (raises where one failed)."""
        while (flight := self.flights.get(key)) is not None:
            await asyncio.shield(flight)
            if self.flights.get(key) is flight:
                del self.flights[key]

    async def _landed_all(self) -> None:
        """Wait for every batch in flight and waiting (a revoke, a stop); where one failed, the others land all the
        same (their partitions go, and their databases close, only after), then its error is raised."""
        failed: Exception | None = None
        for key in list(self.flights):
            try:
                await self._landed(key)
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def _batches(self, key: Key) -> RecordBatches:
        """The outputs of the next batch of `key`: those of its waiting batch, which it joins, if there is one."""
        waiting = self.waiting.get(key)
        if waiting is not None:
            return waiting.out
        producer = self.txns[key] if self.eos else self.producer
        return RecordBatches(producer)

    def _process(self, route: Route, processor: VerifyProcessor, part: PartitionState, messages: list[Any],
                 out: RecordBatches) -> None:
        """Process consecutive records of one partition, in order, in passes over all of them
        (VerifyProcessor.process_batch: a pass runs faster than the whole path per record), at one `now`."""
        started = time.perf_counter()
        records = [record_in(msg, route) for msg in messages]
        sizes = [record_size(record.key, record.value, record.headers) for record in records]
        limit = self.copy_limit - OWN_HEADERS_MAX
        now = time.time()
        results = iter(processor.process_batch([record for record, size in zip(records, sizes, strict=True)
                                                if size <= limit], part.readers, now))  # its writes are in the batch
        share = (time.perf_counter() - started) / len(records)  # each record's latency includes its part of it
        tally = self.tally
        for record, size in zip(records, sizes, strict=True):
            if size > limit:  # no copy would fit: not checked, no state, a stub instead (in its place)
                routed = self._stub(route, record, size, now, out)
                tally.routed(route.name, routed, now)
                continue
            started = time.perf_counter()
            result = next(results)
            self._emit(route, result, out)
            tally.latency(route.name, time.perf_counter() - started + share)
            for routed in result.routed:
                tally.routed(route.name, routed, now)

    def _emit(self, route: Route, result: Result, out: RecordBatches) -> None:
        for routed in result.routed:
            rec = routed.record
            home = rec.home
            if routed.verified_headers is not None:
                out.add(route.verified_topic, home, rec.key, rec.value, routed.verified_headers)
            if routed.quarantine_headers is not None:
                out.add(route.quarantine_topic, home, rec.key, rec.value, routed.quarantine_headers)
            if route.receipts_topic is not None and routed.envelope is not None:
                event_id = routed.envelope.id
                out.add(route.receipts_topic, home, receipt_key(event_id), receipt(
                    event_id, routed.decision.outcome, routed.decision.reasons, route.name, topic=rec.topic,
                    partition=rec.partition, offset=rec.offset, now=time.time()))

    def _stub(self, route: Route, record: RecordIn, size: int, now: float, out: RecordBatches) -> Routed:
        return quarantine_stub(route, record, size, self.copy_limit, now, out)

    def _punctuate(self, key: Key, route: Route, part: PartitionState, out: RecordBatches) -> None:
        """Causal deadlines of one route partition: held records past the deadline go to quarantine."""
        if not route.causal.buffer:
            return
        if not held_count(part.readers[CAUSAL]):
            self.oldest[key] = 0.0
            return
        now = time.time()
        result = self.processors[key].punctuate(part.readers, now)
        self.oldest[key] = result.oldest_held_age or 0.0
        self._publish_causal(route.name)
        self._emit(route, result, out)
        for routed in result.routed:
            self.tally.routed(route.name, routed, now)

    async def _punctuate_idle(self) -> None:
        """Route partitions without a batch for the deadline check's interval get one of their own."""
        assert self._causal_interval is not None
        now = time.monotonic()
        for key, part in list(self.parts.items()):
            route = self.routes[key[0]]
            if route.causal.buffer and now - self.last_batch.get(key, 0.0) >= self._causal_interval:
                await self._finish(key, route, part, self._batches(key), {})

    async def _finish(self, key: Key, route: Route, part: PartitionState, out: RecordBatches,
                      offsets: dict[TopicPartition, int], records: int = 0) -> None:
        """Punctuate one batch of a route partition, then put it in flight (`_launch`), or, while the batch before
        it is in flight, let it wait: the next batches of the partition join it until that one lands."""
        self.last_batch[key] = time.monotonic()
        self._punctuate(key, route, part, out)
        self.tally.flush()
        waiting = self.waiting.get(key)
        if waiting is None:
            if not out and not any(part.pending.values()) and not offsets:
                return
            waiting = self.waiting[key] = _Waiting(out)
        waiting.offsets.update(offsets)
        waiting.records += records
        flight, front = self.flights.get(key), self.fronts.get(key)
        if flight is not None and not flight.done() and front is not None and not front.done():
            if waiting.records >= self.max_records:  # a full batch waits: the loop fetches no further ahead
                await asyncio.wait([flight, front], return_when=asyncio.FIRST_COMPLETED)
                if not front.done():
                    flight.result()  # it failed: raises (else this one is in flight now)
            self._waited = True
            return  # it goes in flight once the batch before it lets it (`_release`)
        self._launched = True
        self._launch(key)

    def _launch(self, key: Key) -> None:
        """Put the waiting batch of `key` in flight: its writes sealed (still read by the next batch), its
        changelog records built, its delivery and store behind the loop (`_fly`). exactly_once: one batch in
        flight per route partition, so its transactions and its stores go in order. at_least_once: a batch goes in
        flight once the outputs of the one before are delivered (and the one before that is stored), so its
        outputs are on their way while the changelog of the one before is (`_fly` keeps the order of the
        changelogs and of the stores)."""
        before = self.flights.get(key)
        if before is not None and before.done():
            before.result()  # the batch before it failed: nothing of this one, built on its state, goes out
            before = None
        waiting = self.waiting.pop(key)
        part = self.parts[key]
        route = self.routes[key[0]]
        records = waiting.out if self.eos else RecordBatches(self.producer)  # exactly_once: in the same transaction
        self._changelog_records(part, self.changelogs[route.name], records)
        writes = part.seal(stacked=self.stacked)
        if route.causal.buffer:
            self.held[key] = held_count(part.readers[CAUSAL])
            self._publish_causal(route.name)
        front = self.fronts[key] = asyncio.get_running_loop().create_future()
        flight = asyncio.ensure_future(self._fly(key, part, waiting.out, records, waiting.offsets, self.consumer,
                                                 writes, before, front))
        flight.add_done_callback(self._flown)
        self.flights[key] = flight

    async def _fly(self, key: Key, part: PartitionState, out: RecordBatches, changelog: RecordBatches,
                   offsets: dict[TopicPartition, int], consumer: AIOKafkaConsumer | None,
                   writes: dict[str, dict[bytes, bytes | None]], before: asyncio.Future[None] | None,
                   front: asyncio.Future[None]) -> None:
        """Deliver and store one sealed batch (`writes`: its own, see the module doc for the order), while the loop
        goes on; put the batch that waited for it in flight as soon as it may go (`_release`)."""
        changelogs = self.changelogs[key[0]]
        inputs = {tp.topic: offset for tp, offset in offsets.items()}
        if self.eos:
            txn = self.txns[key]
            await begin(txn)
            try:
                delivered = await transact(txn, out, offsets, self.group)
            except BaseException:
                part.discard()  # this batch, and the one waiting, built on its state: neither is ever delivered
                await abort(txn)
                raise
        else:
            try:
                await out.deliver()  # the outputs first: a changelog never holds state of an undelivered output
            except Exception as exc:
                if before is not None:  # the worker stops at once, but this batch is done only once the one before
                    self._stop_for(exc)  # it landed: a revoke, a stop wait for a partition's newest batch only
                    await asyncio.wait([before])
                raise
            if self.stacked:
                if before is not None:  # its changelog follows the one before: stored in order (raises if it failed)
                    await asyncio.shield(before)
                self._release(key, part, front)  # the next batch's outputs go beside this one's changelog
            delivered = await changelog.deliver()
        part.store({name: delivered[(topic, part.partition)] for name, topic in changelogs.items()
                    if (topic, part.partition) in delivered}, inputs, sealed=writes if self.stacked else True)
        if offsets and not self.eos and consumer is not None:
            self._commit(consumer, offsets)
        self._release(key, part, front)

    def _release(self, key: Key, part: PartitionState, front: asyncio.Future[None]) -> None:
        """The batch in flight of `front` lets the next one go: the waiting batch goes in flight (a batch being
        built goes in flight from its `_finish`)."""
        if front.done():
            return
        front.set_result(None)
        if key in self.waiting and key not in self._building and self.parts.get(key) is part:
            self._launch(key)

    def _flown(self, task: asyncio.Future[None]) -> None:
        """A batch in flight (or a commit) that failed stops the worker at once; the next batch of its partition,
        a revoke and a stop raise it too."""
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._stop_for(exc)

    def _stop_for(self, exc: BaseException) -> None:
        if not self._failed:
            self._failing = asyncio.ensure_future(self.fail(exc))

    def _publish_causal(self, route: str) -> None:
        """The causal buffer gauges: what this worker's partitions of `route` hold, and the oldest's age."""
        metrics.CAUSAL_HELD.labels(route).set(sum(n for (r, _), n in self.held.items() if r == route))
        metrics.CAUSAL_OLDEST.labels(route).set(max((a for (r, _), a in self.oldest.items() if r == route),
                                                    default=0.0))

    @staticmethod
    def _changelog_records(part: PartitionState, changelogs: dict[str, str], out: RecordBatches) -> None:
        """One changelog record per key the batch changed, in the changelog partition of the route partition."""
        for name, writes in part.pending.items():
            topic = changelogs[name]
            for key, value in writes.items():
                out.add(topic, part.partition, key, value)


async def _commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
    try:
        await consumer.commit(offsets)
    except CommitFailedError as exc:  # a rebalance took them: their state is stored, the new owner resumes
        log.warning("batched runtime: commit failed (%r); the next owner resumes from the stored offsets", exc)


async def _committed_of(bootstrap: str, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The offsets `group` committed for `tps` (read without joining the group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        found = {}
        for tp in tps:
            offset = await consumer.committed(tp)
            if offset is not None:
                found[tp] = offset
        return found
    finally:
        await consumer.stop()


async def _position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
    """The consumer's position in `tp` (0 once it is no longer assigned)."""
    try:
        position: int = await consumer.position(tp)
    except IllegalStateError:  # revoked meanwhile
        return 0
    return position
