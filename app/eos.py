"""Exactly-once for byzguard on faust-streaming 0.15.3: the parts faust's `exactly_once` leaves out.

Faust runs one transactional producer per input partition and commits the input offsets in that
producer's transaction. On its own that is not exactly-once; docs/exactly-once.md has the evidence for
each gap below and how the crash test finds it.

1. `TransactionManager.send` picks the producer from the *output* topic: the consumer's metadata does not
   know a topic the worker only writes, so the record goes through the plain producer, outside any
   transaction (or, once the metadata knows it, the assignor raises KeyError). Fixed: a record sent while a
   stream event is processed goes through the transactional producer of that event's partition.
2. Table changelog writes wait in faust's ProducerBuffer, and the exactly-once commit does not flush it.
   Fixed: a commit first waits until every buffered changelog write is delivered.
3. The commit timer runs concurrently with the agent, so a transaction can hold half an event, or an
   event's outputs without its offset. Fixed: each event is processed and acked under a lock that the
   commit also takes (`process`).
4. RocksDB is written at once, not at commit: after a crash it holds writes of aborted transactions, and
   re-delivered events look like duplicates of themselves. Fixed: a worker that did not stop cleanly
   discards its local tables at the next start; they are restored from the read_committed changelogs.
5. Table recovery: the changelog ends in a commit marker that a read_committed reader never receives, so
   recovery waits for two 5-second idle timeouts, and then its shortcut (consumer position past the
   highwater) can end recovery while records are still on their way, leaving entities out of the tables.
   Fixed: recovery ends when a side consumer finds no committed record after what was applied; the
   shortcut is disabled.
6. Recovery's highwaters under exactly_once are the last stable offsets cached from the last fetch: None
   for a partition not fetched since its assignment, so recovery skips that changelog (empty tables) or
   crashes with ConsistencyError. Fixed: ask the broker (read_committed ListOffsets).
7. Around a rebalance faust delivers some records twice (it fetches before it seeks to the committed
   offsets), skips others (a message abandoned in the rebalance moves the read offset) and acks records its
   stream skipped, while its commit tolerates a one-offset gap. Fixed: only `process` acks records of the
   guarded topics; it drops a record delivered again, and when a record's predecessor never came it seeks
   back to it. This one is not about transactions: under at_least_once a skipped record (seen at the end of
   a large table recovery) leaves an offset nothing acks, faust's commit never passes it again and the worker
   stops committing. Faust's seek to the committed offsets (after a rebalance) reads them while its commit runs:
   a commit that lands in between sets faust's committed offset back below offsets its commit already took off
   the acked ones, whose records come again and are dropped, so the commit stopped for good (seen after a rejoin
   that followed a broker outage); those offsets, processed already, are acked again (`after_seek_to_committed`).
   `install_in_order(app, bootstrap)` wires it under either guarantee.

`install(app, bootstrap)` wires 1-3 and 5-7 into the app before its consumer and producer exist; agents run
each record through `process(app, event, handle)` and call `guard(app, topic)`; the CLI runs the worker
inside `crash_safe_state(...)` for 4.

Under both guarantees, `install_gate(app)` (which `install` calls) puts every offset commit under the
processing lock and runs the `before_commit` hooks inside it first: the guard's buffered state writes
(tables/buffer.py) reach the changelog in the commit that carries their events' offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from faust.streams import current_event
from faust.tables.recovery import Recovery
from faust.transport.consumer import TransactionManager
from faust.types import TP, AppT
from faust.types.tuples import FutureMessage, ack_lock
from mode import Service
from mode.utils.futures import notify

from app.sidereads import started_side_consumer

log = logging.getLogger(__name__)

#: How often a commit that waits for buffered changelog writes (a broker outage) says so in the log.
CHANGELOG_DELIVERY_TIMEOUT = 60.0

#: How often recovery looks whether only transaction markers are left, and how long one look may take.
TAIL_CHECK_INTERVAL = 0.25
TAIL_CHECK_TIMEOUT = 5.0
#: Recovery that applied no changelog record for this long while committed ones are left seeks to them again.
RECOVERY_STALL_SECONDS = 5.0

#: A guarded partition that processed nothing for this long while its highwater is past the next expected
#: record looks for a record skipped at its end (one no later record shows as missing); checked 4x as often.
IDLE_GAP_SECONDS = 10.0

#: Present in the data dir while a worker runs; still there at start means the last worker crashed.
RUNNING_MARKER = "byzguard-worker.running"

_STATE_ATTR = "_byzguard_eos"
_GATE_ATTR = "_byzguard_commit_gate"
_ORDER_ATTR = "_byzguard_in_order"


class CommitGate:
    """The processing lock (no commit inside an event) and the work every commit does first, under it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.before_commit: list[Callable[[], Awaitable[None]]] = []
        #: Run after a commit that returned, with its result (True: offsets, and under exactly_once the
        #: transactions, were committed).
        self.after_commit: list[Callable[[bool], Awaitable[None]]] = []

    async def prepare(self) -> None:
        """Run the before-commit hooks, in the order they were added."""
        for hook in self.before_commit:
            await hook()

    async def finish(self, committed: bool) -> None:
        """Run the after-commit hooks, in the order they were added."""
        for hook in self.after_commit:
            await hook(committed)


def gate_of(app: faust.App) -> CommitGate | None:
    """The commit gate installed on `app`, or None."""
    return getattr(app, _GATE_ATTR, None)


def install_gate(app: faust.App) -> CommitGate:
    """Put `app`'s offset commits under the processing lock, after its before-commit hooks. Call before start."""
    installed = gate_of(app)
    if installed is not None:
        return installed
    if app._consumer is not None:
        raise RuntimeError("eos.install_gate must run before the app's consumer is created")
    gate = CommitGate()
    setattr(app, _GATE_ATTR, gate)
    transport: Any = app.transport
    base_consumer = transport.Consumer

    class Consumer(base_consumer):  # type: ignore[valid-type,misc]
        async def commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
            # Under the processing lock no event is half done: every acked offset has all its outputs and state
            # writes in (under exactly_once: in its partition's transaction) and every unacked one has none.
            async with gate.lock:
                await gate.prepare()
                committed: bool = await super().commit(topics, start_new_transaction=start_new_transaction)
                await gate.finish(committed)
                return committed

    transport.Consumer = Consumer
    return gate


def before_commit(app: faust.App, hook: Callable[[], Awaitable[None]]) -> None:
    """Run `hook` inside every offset commit of `app`, under the processing lock, before the offsets go."""
    install_gate(app).before_commit.append(hook)


def after_commit(app: faust.App, hook: Callable[[bool], Awaitable[None]]) -> None:
    """Run `hook(committed)` after every offset commit of `app` that returned, still under the processing lock."""
    install_gate(app).after_commit.append(hook)


class InOrder:
    """Per-app: which record each guarded partition must process next (fix 7). Installed under both guarantees:
    under at_least_once a record faust never hands to the agent leaves a gap of unacked offsets that faust's
    commit cannot pass, so the worker would stop committing for good; here the next record shows the gap and the
    consumer goes back for the missing one."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        #: Topics whose records only `process` may ack (their agent processes every record it acks).
        self.guarded_topics: set[str] = set()
        self.acking = False
        #: Per partition: (consumer generation, the offset the agent must see next).
        self.expected: dict[TP, tuple[int, int]] = {}
        #: Partitions sought back to a skipped record: the offset whose delivery ends the detour.
        self.seeking: dict[TP, int] = {}
        #: Per partition: monotonic time of the last record processed (or of the last look for a skipped one).
        self.progress: dict[TP, float] = {}
        #: Per partition, what the probe read last: from which offset, and the offsets of the committed records
        #: it got from there (every other offset up to the last of them is a marker or an aborted record).
        self.probed: dict[TP, tuple[int, list[int]]] = {}
        #: Partitions dropping records delivered again: the first one dropped (logged once per run of drops).
        self.dropping: dict[TP, int] = {}
        #: Per partition, the generation whose first record was logged.
        self.announced: dict[TP, int] = {}
        #: Guarded partitions with no record processed since their assignment: (generation, since, last said).
        self.silent_since: dict[TP, tuple[int, float, float]] = {}
        self._probe: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None

    def drop(self, consumer: Any, message: Any) -> bool:
        """Let faust forget a record the agent did not process, without marking its offset committable.

        Faust acks records its stream skipped (flow stopped, or a generation changed, during a rebalance) "so
        the lag does not grow"; the commit in the rebalance then moves past them and they are lost. Dropped
        here instead, the offset stays uncommitted and the record is delivered again.
        """
        with ack_lock:
            if not message.acked:
                message.acked = True  # nothing waits for it any more (Consumer.wait_empty)
                consumer._unacked_messages.discard(message)
                notify(consumer._waiting_for_ack)
        return False

    async def in_order(self, app: faust.App, event: faust.EventT[Any]) -> bool:
        """True if `event` is the record its partition must process next; otherwise drop it (and, if a record
        before it was never delivered, seek back to that one)."""
        consumer: Any = app.consumer
        message = event.message
        tp, offset, generation = message.tp, message.offset, app.consumer_generation_id
        known = self.expected.get(tp)
        if known is not None and known[0] == generation:
            expected: int | None = known[1]
        else:  # first record since the partition was assigned: faust sought to the committed offset
            committed = consumer._committed_offset[tp]
            if committed is None:
                # Faust can hand a record over before its seek has recorded the committed offset. Taken as the
                # start, the offsets before it (a transactional input's markers) would never be acked, and the
                # commit would stop there for good: ask the group coordinator.
                committed = await self._group_committed(app, tp)
                if committed is not None and committed < 0:
                    # The group has committed nothing here (a fresh group, or its first commit failed in a broker
                    # outage), so the partition starts where faust's offset reset puts it: at its log start
                    # ("earliest"). Taken from the first record delivered instead, the records before it were
                    # lost: after a rejoin that followed an outage, the fetch handed over record 88 first, the
                    # commit passed 22-87 (never processed) and 66 events had no output.
                    committed = await self._reset_offset(app, tp)
            expected = committed if committed is not None and committed >= 0 else None
            self.seeking.pop(tp, None)
            if self.announced.get(tp) != generation:  # once: until one is processed, every record comes here
                self.announced[tp] = generation
                log.info("%s: first record since the assignment (generation %d): %d; the next to process is %s "
                         "(faust's committed offset %s)", tp, generation, offset, expected,
                         consumer._committed_offset[tp])
        if expected is None or offset == expected:
            self.seeking.pop(tp, None)
            if self.dropping:
                self.dropping.pop(tp, None)
            return True
        if offset < expected:
            # Delivered again (faust fetched it twice around a rebalance): its outputs and ack are in already.
            if tp not in self.dropping:  # once per run of them: around a rebalance there can be many
                self.dropping[tp] = offset
                log.info("%s: record %d delivered again after it was processed; dropped, as are the next ones "
                         "until %d comes", tp, offset, expected)
            return self.drop(consumer, message)
        if self.seeking.get(tp) == expected:
            # Still on the way back to the skipped record. A record fetched before the seek and handed over
            # after it moves faust's read offset past the one we wait for, which would then be dropped when it
            # comes: seek again.
            read = consumer._read_offset.get(tp)
            if read is not None and read > expected:
                log.info("%s: record %d came while seeking back to %d (read offset %d); seeking again",
                         tp, offset, expected, read)
                await consumer.seek(tp, expected)
            return self.drop(consumer, message)
        first = await self._first_record_from(tp, expected, offset)
        if first is None or first >= offset:
            # Only transaction markers or aborted records in between: let faust's commit pass them.
            self.ack_without_record(consumer, tp, expected, offset)
            return True
        log.warning("%s: record %d delivered but %d never was; seeking back to it", tp, offset, first)
        await self._seek_back(consumer, tp, generation, expected, first)
        return self.drop(consumer, message)

    def processed(self, app: faust.App, event: faust.EventT[Any]) -> None:
        """Record that the agent processed `event`; ack it (inside the lock, so no commit comes between)."""
        message = event.message
        self.expected[message.tp] = (app.consumer_generation_id, message.offset + 1)
        self.progress[message.tp] = time.monotonic()
        self.acking = True
        try:
            event.ack()
        finally:
            self.acking = False

    def forget(self, revoked: Iterable[TP]) -> None:
        """Drop what is known of revoked partitions: if they come back, the committed offset says where to go on."""
        for tp in revoked:
            for known in (self.expected, self.seeking, self.dropping, self.silent_since, self.announced):
                known.pop(tp, None)

    def after_seek_to_committed(self, consumer: Any, generation: int) -> None:
        """Faust sought to the committed offsets (`Consumer.perform_seek`): ack again what was processed above them.

        Faust reads the committed offsets on its consumer's thread and then sets its own committed offsets to
        them, while the commit timer commits concurrently (the seek is not under the processing lock). A commit
        that lands between the read and its use is undone in faust's bookkeeping: its committed offset goes back
        below offsets its commit already took off the acked ones, and its commit never passes them again (it
        waits for the ack of the first one above its committed offset). Faust itself would ack the records
        the seek delivers again; `in_order` drops them, processed already, so nothing came to fill the gap and
        the worker stopped committing for good: seen after a rejoin that followed a broker outage, where faust
        seeks twice (in a fetch that returned while the flow was stopped, then at the end of recovery) with
        records processed and committed in between. Every offset below the one a partition expects next was
        processed in this generation (or holds no record): acked again here, the commit passes them.
        """
        assigned = consumer.assignment()
        for tp, (known, expected) in list(self.expected.items()):
            if known != generation or tp not in assigned:
                continue
            committed = consumer._committed_offset[tp]
            if committed is not None and committed < expected:
                acked = self.ack_without_record(consumer, tp, committed, expected)
                if acked:
                    log.warning("%s: faust's seek set its committed offset back to %d, below offsets its commits "
                                "already took (%s a commit in flight), with %d next: %d processed offsets acked again",
                                tp, committed, "with" if consumer._commit_fut is not None else "without", expected,
                                acked)

    @staticmethod
    def ack_without_record(consumer: Any, tp: TP, first: int, end: int) -> int:
        """Mark offsets `first`..`end`-1 of `tp`, which hold no record to process (or whose records were processed
        already), acked for faust's commit (the bookkeeping of faust's `Consumer.ack`, without a message); return
        how many were not acked yet. Not a gap (`Consumer._add_gap`): faust's commit applies gaps only below the
        highest acked offset, so a gap at a partition's end would never be passed."""
        added = 0
        with ack_lock:
            committed = consumer._committed_offset[tp]
            acked_index = consumer._acked_index[tp]
            for offset in range(first, end):
                if (committed is None or offset >= committed) and offset not in acked_index:
                    acked_index.add(offset)
                    consumer._acked[tp].append(offset)
                    added += 1
            consumer._n_acked += added
            notify(consumer._waiting_for_ack)
        return added

    async def find_skipped_tails(self, app: faust.App) -> None:
        """Seek back to a record skipped at the end of a partition: no later record comes to show the gap, so
        look at partitions idle for IDLE_GAP_SECONDS whose highwater is past the record they expect next. If
        only transaction markers are left there, count them as acked for the commit to pass."""
        consumer: Any = app.consumer
        generation, now = app.consumer_generation_id, time.monotonic()
        assigned = consumer.assignment()
        if app.rebalancing or app.in_recovery:  # paused on purpose (faust says when recovery gets nothing)
            self.silent_since.clear()
        else:
            self._report_silent(consumer, generation, assigned, now)
        for tp, (known, expected) in list(self.expected.items()):
            if known != generation or tp not in assigned or now - self.progress.get(tp, now) < IDLE_GAP_SECONDS:
                continue
            highwater = consumer.highwater(tp)  # the last stable offset under exactly_once
            if highwater is None or highwater <= expected:
                continue
            self.progress[tp] = now  # look again only after another idle period
            try:
                first = await self._first_record_from(tp, expected, highwater)
            except (TimeoutError, KafkaError) as exc:  # the broker is slow or away: wait it out, look again later
                log.warning("%s: could not look for a skipped record: %s", tp, exc)
                continue
            if self.expected.get(tp) != (known, expected):
                continue  # a record came meanwhile
            if first is None or first >= highwater:
                # Only transaction markers (or aborted records) left: count them as acked, or the group's lag
                # stays at their count for as long as no record comes.
                self.ack_without_record(consumer, tp, expected, highwater)
                self.expected[tp] = (generation, highwater)
                continue
            log.warning("%s: idle at %d below its highwater %d: record %d was never delivered; seeking back to it",
                        tp, expected, highwater, first)
            await self._seek_back(consumer, tp, generation, expected, first)

    def _report_silent(self, consumer: Any, generation: int, assigned: Any, now: float) -> None:
        """Say (every IDLE_GAP_SECONDS) which guarded partitions delivered no record for that long outside rebalances
        and recovery although their highwater is past the committed offset (or they were never fetched), with
        faust's bookkeeping of them: a fetch that never resumes shows here."""
        for tp in assigned:
            if tp.topic not in self.guarded_topics:
                continue
            known = self.expected.get(tp)
            if known is not None and known[0] == generation:
                continue
            since = self.silent_since.get(tp)
            if since is None or since[0] != generation:
                self.silent_since[tp] = (generation, now, now)
                continue
            if now - since[1] < IDLE_GAP_SECONDS or now - since[2] < IDLE_GAP_SECONDS:
                continue
            committed, highwater = consumer._committed_offset[tp], consumer.highwater(tp)
            if highwater is not None and highwater <= (committed or 0):
                continue  # nothing to deliver
            self.silent_since[tp] = (generation, since[1], now)
            log.warning("%s: no record delivered for %.0f s since its assignment (generation %d): committed %s, "
                        "read offset %s, highwater %s, expected %s, seeking %s, paused %s, flow active %s, "
                        "unacked %d", tp, now - since[1], generation, committed, consumer._read_offset.get(tp),
                        highwater, known, self.seeking.get(tp), tp in consumer._paused_partitions,
                        consumer.flow_active, len(consumer._unacked_messages))

    async def _seek_back(self, consumer: Any, tp: TP, generation: int, expected: int, first: int) -> None:
        """Send `tp` back to the skipped record `first`; everything else is dropped until it comes. The offsets
        from `expected` to it hold no record (markers of a transactional input): acked, or faust's commit would
        stop before them for good while the outputs of later records still commit."""
        if first > expected:
            self.ack_without_record(consumer, tp, expected, first)
        self.seeking[tp] = first
        self.expected[tp] = (generation, first)
        await consumer.seek(tp, first)

    async def _first_record_from(self, tp: TP, start: int, end: int) -> int | None:
        """Offset of the first record a read_committed reader gets at or after `start` (looking up to `end`).

        A topic written in transactions has a marker after every transaction, so nearly every record of it
        follows a gap: the committed offsets one look read (a fetch of up to 64 KiB) answer the next gaps
        within them, rather than a look per marker.
        """
        known = self.probed.get(tp)
        if known is not None and known[0] <= start <= known[1][-1]:
            return next(offset for offset in known[1] if offset >= start)
        if self._probe is None:
            self._probe = await _read_committed_consumer(self.bootstrap)
        read: dict[TP, list[int]] = {}
        found = await _first_committed(self._probe, {tp: start}, {tp: end}, read=read)
        if tp not in found:
            raise TimeoutError(f"could not read {tp} from offset {start} within {TAIL_CHECK_TIMEOUT} s")
        if read.get(tp):
            self.probed[tp] = (start, read[tp])
        return found[tp]

    async def _group_committed(self, app: faust.App, tp: TP) -> int | None:
        """The offset the app's group has committed for `tp`: -1 if none, None if the coordinator did not answer."""
        try:
            if self._admin is None:
                self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
                await self._admin.start()
            atp = TopicPartition(tp.topic, tp.partition)
            found = await self._admin.list_consumer_group_offsets(app.conf.id, partitions=[atp])
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("%s: could not read the group's committed offset: %s", tp, exc)
            return None
        meta = found.get(atp)
        return int(meta.offset) if meta is not None and meta.offset >= 0 else -1

    async def _reset_offset(self, app: faust.App, tp: TP) -> int | None:
        """Where faust's offset reset starts `tp` when its group has committed nothing: the log start offset under
        "earliest"; None under "latest" (any record can be the first) or if the broker did not answer."""
        if app.conf.consumer_auto_offset_reset != "earliest":
            return None
        atp = TopicPartition(tp.topic, tp.partition)
        try:
            if self._probe is None:
                self._probe = await _read_committed_consumer(self.bootstrap)
            starts = await self._probe.beginning_offsets([atp])
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("%s: could not read the log start offset: %s", tp, exc)
            return None
        return int(starts[atp]) if atp in starts else None

    async def close(self) -> None:
        """Stop the side consumer and admin client `in_order` may have started (at shutdown)."""
        probe, self._probe = self._probe, None
        if probe is not None:
            await probe.stop()
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()


async def rewind_recovery(app: faust.App, consumer: Any) -> None:
    """After faust's seek to the committed offsets during table recovery, send the changelog partitions still being
    recovered back to the last record recovery applied (it skips what it applied already).

    Faust's fetch loop seeks to the committed offsets when a fetch returns while the flow is stopped, and drops
    what that fetch returned: for a changelog partition (no committed offset, so not sought back) those records
    were gone and recovery waited for them for good, the input partitions paused behind it (seen when a second
    worker joined: "No event received for active tp ... since recovery start", the group's lag never shrank).
    """
    recovery: Any = app.tables._recovery  # type: ignore[attr-defined]
    if recovery is None or not recovery.in_recovery:
        return
    behind: dict[TP, int] = {}
    for tp in recovery.active_tps:
        applied, highwater = recovery.active_offsets.get(tp), recovery.active_highwaters.get(tp)
        if applied is not None and highwater is not None and applied < highwater:
            behind[tp] = max(applied, 0)  # as Recovery._seek_offsets: the last applied one again, or the start
    if behind:
        log.info("sought to the committed offsets during recovery: changelog partitions sent back to %s",
                 {f"{tp.topic}[{tp.partition}]": offset for tp, offset in behind.items()})
        for tp, offset in behind.items():
            await consumer.seek(tp, offset)


def order_of(app: faust.App) -> InOrder | None:
    """The in-order state installed on `app`, or None."""
    return getattr(app, _ORDER_ATTR, None)


def install_in_order(app: faust.App, bootstrap: str) -> InOrder:
    """Let only `process` ack records of guarded topics, each in offset order (fix 7). Under either guarantee;
    `install` calls it. Call before start."""
    installed = order_of(app)
    if installed is not None:
        return installed
    if app._consumer is not None:
        raise RuntimeError("eos.install_in_order must run before the app's consumer is created")
    order = InOrder(bootstrap)
    setattr(app, _ORDER_ATTR, order)
    transport: Any = app.transport
    base_consumer = transport.Consumer

    class Consumer(base_consumer):  # type: ignore[valid-type,misc]
        def ack(self, message: Any) -> bool:
            if message.topic in order.guarded_topics and not order.acking:
                return order.drop(self, message)
            acked: bool = super().ack(message)
            return acked

        async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
            # Faust's fetch loop marks every jump of the read offset as a gap that its commit counts as acked.
            # A jump is not always a gap: records skipped at the end of table recovery, or the jump back and
            # forth of a seek to a skipped record, were counted as acked before they were processed (commits
            # ran ahead of processing), and their real acks then entered `_acked` twice, which cut faust's commit
            # to one offset per commit (the memory phase crawled at 2 offsets/s per partition). For guarded
            # topics, offsets with no record are acked by `in_order` and `find_skipped_tails` instead, after
            # their probe found no record there (`InOrder.ack_without_record`).
            if tp.topic in order.guarded_topics:
                return
            await super()._add_gap(tp, offset_from, offset_to)

        async def on_partitions_revoked(self, revoked: set[TP]) -> None:
            order.forget(revoked)  # as faust forgets their acks: what they expect next is decided anew
            await super().on_partitions_revoked(revoked)

        async def perform_seek(self) -> None:
            await super().perform_seek()
            order.after_seek_to_committed(self, app.consumer_generation_id)
            await rewind_recovery(app, self)

        async def _seek(self, partition: TP, offset: int) -> None:
            # Faust calls aiokafka's seek from the event loop's thread while the consumer's own thread is
            # fetching: the fetcher then crashed with KeyError in fetched_records, or the partition was not fetched
            # again (both seen in the benchmark's memory phase). Seek on the consumer's thread instead.
            thread = self._thread
            await thread.call_thread(thread._ensure_consumer().seek, partition, offset)

    transport.Consumer = Consumer

    @app.timer(interval=IDLE_GAP_SECONDS / 4)  # type: ignore[untyped-decorator]  # faust's App.timer is untyped
    async def find_skipped_tails() -> None:
        gate = gate_of(app)
        if gate is None:
            await order.find_skipped_tails(app)
            return
        asked = time.monotonic()
        async with gate.lock:  # no event in the middle of processing, no commit in the middle of the seek
            now = time.monotonic()
            if now - asked > IDLE_GAP_SECONDS / 4:
                # A commit held the lock (waiting out a broker outage): the partitions were idle because processing
                # waited, not because a record was skipped. Seeking back then only fetched everything again.
                order.progress = dict.fromkeys(order.progress, now)
                return
            await order.find_skipped_tails(app)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode's Signal.connect is typed for plain functions; faust awaits async receivers
    async def close_probe(sender: Any, **kwargs: Any) -> None:
        await order.close()

    return order


class ExactlyOnce:
    """Per-app state of exactly_once: the buffered changelog writes a commit waits for (fix 2)."""

    def __init__(self) -> None:
        self.pending: set[FutureMessage] = set()
        self.warned_topics: set[str] = set()

    def track(self, fut: FutureMessage) -> None:
        """Remember a buffered send until it is delivered (or fails)."""
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)

    async def wait_delivered(self) -> None:
        """Wait until every buffered send so far is delivered; raise if one failed. A broker outage is waited
        out (the producer retries each send up to faust's `producer_request_timeout`), said in the log every
        CHANGELOG_DELIVERY_TIMEOUT seconds."""
        pending = list(self.pending)
        if not pending:
            return
        gathered = asyncio.gather(*pending)
        started = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(gathered), CHANGELOG_DELIVERY_TIMEOUT)
                return
            except TimeoutError:
                log.warning("waiting %.0f s for %d buffered sends (is the broker away?); the commit waits",
                            time.monotonic() - started, len(pending))


def state_of(app: AppT) -> ExactlyOnce | None:
    """The exactly-once state installed on `app`, or None (at_least_once)."""
    return getattr(app, _STATE_ATTR, None)


def install(app: faust.App, bootstrap: str) -> ExactlyOnce:
    """Give `app` the fixed transaction manager, consumer, producer and recovery. Call before start."""
    if app._consumer is not None or app._producer is not None:
        raise RuntimeError("eos.install must run before the app's consumer and producer are created")
    if gate_of(app) is not None:
        raise RuntimeError("eos.install must run before eos.install_gate (the gate wraps its consumer)")
    tables: Any = app.tables
    if tables._recovery is not None:
        raise RuntimeError("eos.install must run before the table manager builds its recovery service")
    tables._recovery = MarkerAwareRecovery(app, tables, bootstrap=bootstrap, beacon=tables.beacon)
    install_in_order(app, bootstrap)
    transport: Any = app.transport
    base_consumer = transport.Consumer
    base_producer = transport.Producer

    class Consumer(base_consumer):  # type: ignore[valid-type,misc]
        async def commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
            # Called by the gate's commit, under the processing lock (install_gate, below).
            await state.wait_delivered()
            committed: bool = await super().commit(topics, start_new_transaction=start_new_transaction)
            return committed

        async def _commit_offsets(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
            did_commit: bool = await super()._commit_offsets(offsets, start_new_transaction=start_new_transaction)
            if did_commit and self.in_transaction:
                # faust's livelock check reads the commit times that only its plain (non-transactional) commit
                # records; offsets committed in the partitions' transactions were never seen, so five minutes
                # after the start it logged "Has not committed ... at all since worker start (report as bug)"
                # while every offset was committed. Record them as that commit does.
                now, assigned = time.monotonic(), self.assignment()
                self._thread.tp_last_committed_at.update({tp: now for tp in offsets if tp in assigned})
            return did_commit

        async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
            # Faust under exactly_once answers with the last stable offset cached from the last fetch response,
            # None (read as "empty") for a partition not fetched since it was assigned: recovery then skips the
            # changelog and starts from empty tables, or crashes with ConsistencyError when a persisted offset
            # exists. Ask the broker instead: a read_committed ListOffsets returns the last stable offset.
            thread = self._thread
            consumer = thread._ensure_consumer()
            offsets: Mapping[TP, int] = await thread.call_thread(consumer.end_offsets, list(partitions))
            return offsets

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
    # The gate wraps the consumer above: it takes the processing lock, runs the hooks, then calls its commit.
    install_gate(app)
    state = ExactlyOnce()
    setattr(app, _STATE_ATTR, state)
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
        if event is None and partition is None and _group_of(self.app, topic) is not None:
            partition = self.consumer.key_partition(topic, key, partition)
        return transactional_id(self.app, topic, partition, source=event.message.tp if event is not None else None)


def transactional_id(app: AppT, topic: str, partition: int | None, *, source: TP | None = None) -> str | None:
    """Under exactly_once, the transaction a record for `topic`/`partition` belongs to: that of the input
    partition `source` whose event caused it; without a source (the table buffer, a timer), that of its own
    partition when the worker consumes `topic` (changelogs are co-partitioned with the events that wrote them),
    else None: the record goes out through the plain producer, outside any transaction (warned once per topic)."""
    if source is not None:
        return _id_for(app, app.assignor.group_for_topic(source.topic), source.partition)
    group = _group_of(app, topic)
    if group is not None and partition is not None:
        return _id_for(app, group, partition)
    state = state_of(app)
    if state is not None and topic not in state.warned_topics:
        state.warned_topics.add(topic)
        log.warning("send to %r outside any stream event: not part of a transaction", topic)
    return None


def _group_of(app: AppT, topic: str) -> int | None:
    try:
        group: int = app.assignor.group_for_topic(topic)
    except KeyError:
        return None
    return group


def _id_for(app: AppT, group: int, partition: int) -> str:
    return f"{app.conf.id}-{group}-{partition}"


class MarkerAwareRecovery(Recovery):
    """Table recovery that ends as soon as nothing but transaction markers or aborted records is left."""

    def __init__(self, app: faust.App, tables: Any, *, bootstrap: str, **kwargs: Any) -> None:
        self.bootstrap = bootstrap
        super().__init__(app, tables, **kwargs)

    @Service.task
    async def _end_at_transaction_markers(self) -> None:
        tail: AIOKafkaConsumer | None = None
        progress: tuple[dict[TP, int], float] = ({}, 0.0)
        loop = asyncio.get_running_loop()
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
                if behind != progress[0]:
                    progress = (behind, loop.time())
                if tail is None:
                    tail = await _read_committed_consumer(self.bootstrap)
                ends = {tp: self.active_highwaters[tp] + 1 for tp in behind}
                # Done where no committed record follows what recovery applied.
                first = await _first_committed(tail, {tp: offset + 1 for tp, offset in behind.items()}, ends)
                finished = {tp for tp, offset in first.items() if offset is None}
                # Recovery may have moved on while we looked: only what did not change is decided.
                if not self.in_recovery or not self.tables.changelog_queue.empty():
                    continue
                for tp in finished:
                    if self.active_offsets[tp] == behind[tp]:
                        self.active_offsets[tp] = self.active_highwaters[tp]
                stalled = [tp for tp in behind if tp not in finished and self.active_offsets[tp] == behind[tp]]
                if stalled and loop.time() - progress[1] > RECOVERY_STALL_SECONDS:
                    # Committed records are left, but the worker's consumer has delivered none for a while
                    # (seen after rebalances: faust's fetch bookkeeping drops them). Seek to them again.
                    self.log.warning("Recovery got no changelog record for %.0f s; seeking %s again",
                                     loop.time() - progress[1], {tp: behind[tp] + 1 for tp in stalled})
                    for tp in stalled:
                        await self.app.consumer.seek(tp, behind[tp] + 1)
                    progress = (behind, loop.time())
                if finished and not self.need_recovery():
                    self.log.info("Only transaction markers left in %d changelog partition(s): recovery done",
                                  len(finished))
                    self.flush_buffers()
                    self._set_recovery_ended()
                    self.signal_recovery_end.set()
        finally:
            if tail is not None:
                await tail.stop()


async def _read_committed_consumer(bootstrap: str) -> AIOKafkaConsumer:
    """A started side consumer outside any group that sees only committed records."""
    # It reads one record per look: small fetches, not aiokafka's default of up to 50 MB buffered ahead. It always
    # seeks where it reads; an offset gone from the log resets to the end (aiokafka's default), as it always did.
    return await started_side_consumer(bootstrap, max_partition_fetch_bytes=64 * 1024, fetch_max_bytes=1024 * 1024,
                                       auto_offset_reset="latest")


async def _first_committed(consumer: AIOKafkaConsumer, starts: dict[TP, int],
                           ends: dict[TP, int], *, read: dict[TP, list[int]] | None = None) -> dict[TP, int | None]:
    """Per partition, the offset of the first record a read_committed reader gets at or after its start, or
    None if its position reaches its end with no record; partitions undecided within TAIL_CHECK_TIMEOUT are
    left out. `read`, when given, gets the offsets of the records of the fetch that held the first one."""
    by_tp = {TopicPartition(tp.topic, tp.partition): tp for tp in starts}
    if consumer.assignment() != set(by_tp):
        consumer.assign(list(by_tp))
    for atp, tp in by_tp.items():
        consumer.seek(atp, starts[tp])
    undecided = set(by_tp)
    found: dict[TP, int | None] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TAIL_CHECK_TIMEOUT
    while undecided and loop.time() < deadline:
        batch = await consumer.getmany(*undecided, timeout_ms=200)
        for atp, records in batch.items():
            if records:
                found[by_tp[atp]] = int(records[0].offset)
                undecided.discard(atp)
                if read is not None:
                    read[by_tp[atp]] = [int(r.offset) for r in records]
        for atp in list(undecided):
            # read_committed never passes the last stable offset, so reaching the end also means no
            # transaction is still open there.
            if await consumer.position(atp) >= ends[by_tp[atp]]:
                found[by_tp[atp]] = None
                undecided.discard(atp)
    return found


async def process(app: faust.App, event: faust.EventT[Any],
                  handle: Callable[[faust.EventT[Any]], Awaitable[None]]) -> None:
    """Run `handle(event)` once per record: in offset order, with no commit in between, then ack it.

    Around rebalances (and the end of table recovery) faust can deliver a record twice or not at all (it fetches
    before it seeks to the committed offsets, and records fetched while the flow stops or the generation changes
    are abandoned though the read offset moved past them); a record delivered again is dropped, and one whose
    predecessor never came sends the consumer back to that predecessor.
    """
    gate = gate_of(app)
    if gate is None:
        await handle(event)
        return
    order = order_of(app)
    async with gate.lock:
        if order is None:  # no order checks installed: only no commit (and its flush) in the middle of an event
            await handle(event)
        elif await order.in_order(app, event):
            await handle(event)
            order.processed(app, event)


@contextlib.asynccontextmanager
async def processing(app: faust.App, event: faust.EventT[Any]) -> AsyncIterator[None]:
    """Process one event with no commit in between and ack it inside the lock (no order or duplicate checks:
    prefer `process`, which can skip a record delivered twice)."""
    order, gate = order_of(app), gate_of(app)
    if order is None or gate is None:
        yield
        return
    async with gate.lock:
        yield
        order.processed(app, event)


def guard(app: faust.App, topics: faust.TopicT) -> None:
    """Let only `process` ack records of `topics` (see InOrder.drop); no-op without `install_in_order`."""
    order = order_of(app)
    if order is not None:
        order.guarded_topics.update(topics.topics)


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
