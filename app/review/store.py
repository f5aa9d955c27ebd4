"""The review state read from Kafka, and the one way to write review decisions.

Reading: one read_committed consumer, assigned every partition of the decisions topic (no consumer group:
every worker and every CLI run reads everything), feeds the decisions into a byzguard.review.ReviewLedger.
`refresh()` catches up to the end offsets taken when it starts, so the state a reader derives is the same from
any worker and survives restarts: it lives in the two topics, not here. The quarantined records themselves are
not held: `scan()` reads the quarantine topics from their start for each question (a page of the list, one
record, the records a bulk action selects), so the store holds a bounded amount whatever the topic's size
(`page()` keeps the summaries of one window of matching records, newest first, and counts in bounded memory).

Writing: every write to the decisions topic (approve, reject, recheck, and the replay markers) happens in a
Kafka transaction of ONE transactional id shared by every writer of that topic (`byzguard-review-<decisions
topic>`: all workers and CLI runs of a deployment), inside `_exclusive()`:

    1. start a producer with that id: InitProducerId bumps the epoch, which fences every other holder (their
       later sends and commits fail) and aborts any transaction a previous holder left open, also one whose
       process was SIGKILLed; it returns only once that transaction is completed or aborted;
    2. refresh: read the decisions topic (read_committed) to its end, taken after step 1;
    3. plan from that state, each record at most once, and write in transactions: a replay writes the record
       to the verified topic AND its "replayed" entry to the decisions topic in the same transaction.

Why replay is exactly-once: take two committed transactions that both deliver record R. Within one epoch
(one `_exclusive()` block) the plan lists R once, so they have epochs e1 < e2. The e1 transaction committed
before the InitProducerId of e2 (after it, e1 is fenced and cannot commit), so its "replayed" entry for R was
in the decisions topic when the e2 holder read it in step 2: R was planned as replayed, not sent. A crash
between the two writes of one transaction aborts both. Downstream must read the verified topic with
isolation_level=read_committed, as for everything the guard writes under exactly_once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from app.sidereads import side_consumer, started_side_consumer, topic_partitions
from byzguard.config import GuardConfig, Route
from byzguard.errors import InfrastructureError
from byzguard.review import (
    Action,
    DecisionEntry,
    Plan,
    ReviewFilter,
    ReviewItem,
    ReviewLedger,
    Status,
    Tally,
    item_summary,
    new_decision,
    parse_quarantined,
    plan,
    recheck_headers,
    replay_headers,
    status_of,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (done, total)

WRITE_ATTEMPTS = 8
REFRESH_TIMEOUT = 60.0
SCAN_TIMEOUT = 300.0
SCAN_BATCH = 200  # records per fetch of a scan
SCAN_FETCH_BYTES = 256 << 10  # bytes per partition per fetch: with SCAN_BATCH, what a scan holds at once
MAX_WINDOW = 5_000  # offset + limit of one page: the summaries a page keeps while it scans
SUMMARY_TEXT = 256  # characters of each string in a list summary
DECIDE_CHUNK = 500  # records per transaction of a bulk review action


@dataclass
class Page:
    """One window of matching records, newest first: their summaries, how many match, and counts of all."""

    total: int
    offset: int
    limit: int
    records: list[dict[str, Any]]
    counts: dict[str, dict[str, int]]


def decisions_topic_name(app_id: str, configured: str | None = None) -> str:
    """The decisions topic: as configured, else `<app_id>-decisions`."""
    return configured or f"{app_id}-decisions"


@dataclass
class ActionReport:
    """What one review action (or replay) did, record by record."""

    action: str
    applied: list[str] = field(default_factory=list)
    unchanged: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    delivered: list[tuple[str, str]] = field(default_factory=list)  # (quarantine id, where it was written)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"action": self.action, "applied": self.applied,
                "unchanged": [{"quarantine_id": q, "why": w} for q, w in self.unchanged],
                "refused": [{"quarantine_id": q, "why": w} for q, w in self.refused],
                "delivered": [{"quarantine_id": q, "to": t} for q, t in self.delivered]}


def _coordinates(topic: str, partition: int, offset: int) -> str:
    return f"{topic}-{partition}-{offset}"


def _collect_failed_producers() -> None:
    """Collect fenced producers now, quietly.

    aiokafka leaves a fenced producer's error on internal futures nobody reads; asyncio reports each one when it
    is garbage-collected, formatting a traceback, which on CPython 3.11 parses source: if that collection
    happens inside another compile() (an import, pytest's assertion rewriting) the compiler fails with
    "SystemError: AST constructor recursion depth mismatch". So collect here, where nothing is compiling, and
    drop those reports: the error was already handled and logged once.
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), KafkaError) and "never retrieved" in context.get("message", ""):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(quiet)
    try:
        gc.collect()
    finally:
        loop.set_exception_handler(previous)


class ReviewStore:
    """Quarantine + decisions, read into a ledger; decisions written under the deployment's review fence."""

    def __init__(self, bootstrap: str, config: GuardConfig, *, app_id: str, decisions_topic: str | None = None,
                 client_id: str = "byzguard-review") -> None:
        self.bootstrap = bootstrap
        self.app_id = app_id
        self.routes: dict[str, Route] = {r.name: r for r in config.routes}
        self.decisions_topic = decisions_topic_name(app_id, decisions_topic)
        self.quarantine_topics = sorted({r.quarantine_topic for r in config.routes})
        self.default_types = {r.name: r.default_type for r in config.routes}
        # The fence is per decisions topic: every worker and CLI that writes it shares this one id.
        self.transactional_id = f"byzguard-review-{self.decisions_topic}"
        self.client_id = client_id
        self.ledger = ReviewLedger()
        self._consumer: AIOKafkaConsumer | None = None
        self._assigned: set[TopicPartition] = set()
        self._next_offset: dict[TopicPartition, int] = {}
        self._read_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._in_flight: list[asyncio.Future[Any]] = []
        self._decisions_topic_ready = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ReviewStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def started(self) -> bool:
        """Whether the consumer is running."""
        return self._consumer is not None

    async def start(self) -> None:
        """Start reading (a missing topic reads as empty); idempotent."""
        async with self._start_lock:
            if self._consumer is not None:
                return
            try:
                self._consumer = await started_side_consumer(self.bootstrap, client_id=self.client_id)
            except KafkaError as exc:
                raise InfrastructureError(f"cannot reach Kafka at {self.bootstrap}: {exc}") from exc

    async def stop(self) -> None:
        """Stop reading."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        self._assigned = set()

    async def ensure_decisions_topic(self) -> None:
        """Create the compacted decisions topic when it is missing (keyed by quarantine id, kept forever)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=30_000,
                                    client_id=self.client_id)
        try:
            await admin.start()
        except KafkaError as exc:
            await admin.close()
            raise InfrastructureError(f"cannot reach Kafka at {self.bootstrap}: {exc}") from exc
        try:
            # list_topics, not describe_topics: a metadata request for a missing topic may auto-create it
            # with the broker's defaults (not compacted).
            if self.decisions_topic in await admin.list_topics():
                return
            brokers = len((await admin.describe_cluster()).get("brokers", [])) or 1
            with contextlib.suppress(TopicAlreadyExistsError):
                response = await admin.create_topics([NewTopic(
                    self.decisions_topic, 1, min(3, brokers),
                    topic_configs={"cleanup.policy": "compact", "min.compaction.lag.ms": "3600000"},
                )])
                for error in response.to_object().get("topic_errors", []):
                    # 36: another worker or CLI created it first.
                    if error.get("error_code") not in (0, 36, None):
                        raise InfrastructureError(f"cannot create the decisions topic {self.decisions_topic!r}: "
                                                  f"{error}")
        finally:
            await admin.close()

    # ------------------------------------------------------------------ reading

    async def _ensure_assigned(self) -> None:
        assert self._consumer is not None
        if self._assigned:  # the decisions topic's partitions, found once it exists
            return
        wanted = set(await topic_partitions(self._consumer, [self.decisions_topic]))
        if wanted == self._assigned:
            return
        self._consumer.assign(sorted(wanted))
        for tp in wanted:
            if tp in self._next_offset:
                self._consumer.seek(tp, self._next_offset[tp])
            else:
                await self._consumer.seek_to_beginning(tp)
        self._assigned = wanted

    async def refresh(self, progress: Progress | None = None, *, timeout: float = REFRESH_TIMEOUT) -> None:
        """Read the decisions topic up to its current (committed) end."""
        if self._consumer is None:
            await self.start()
        assert self._consumer is not None
        consumer = self._consumer
        async with self._read_lock:
            try:
                await self._ensure_assigned()
                if not self._assigned:
                    return
                ends = await consumer.end_offsets(list(self._assigned))
                starts = {tp: await consumer.position(tp) for tp in ends}
                self._next_offset.update(starts)
                remaining = {tp: end for tp, end in ends.items() if starts[tp] < end}
                total = sum(end - starts[tp] for tp, end in remaining.items())
                deadline = time.monotonic() + timeout
                positions = dict(starts)
                while remaining:
                    batch = await consumer.getmany(*remaining, timeout_ms=200)
                    for tp, records in batch.items():
                        for rec in records:
                            self._apply(tp, rec)
                    for tp, end in list(remaining.items()):
                        positions[tp] = self._next_offset[tp] = await consumer.position(tp)
                        if positions[tp] >= end:
                            del remaining[tp]
                    if progress is not None:
                        progress(sum(min(positions[tp], end) - starts[tp] for tp, end in ends.items()
                                     if starts[tp] < end), total)
                    if time.monotonic() > deadline:
                        raise InfrastructureError(f"reading the review topics did not reach their end within "
                                                  f"{timeout:.0f} s (left: {sorted(map(str, remaining))})")
            except KafkaError as exc:
                raise InfrastructureError(f"reading the review topics failed: {exc}") from exc

    def _apply(self, tp: TopicPartition, rec: Any) -> None:
        self.ledger.add_decision(rec.key, rec.value)

    def _partitions_of(self, selection: ReviewFilter | None) -> dict[str, set[int]] | None:
        """Which quarantine partitions can hold the selected ids (a record keeps its input's partition and its
        id names the input's coordinates); None: all of them."""
        if selection is None or not selection.ids:
            return None
        by_input = {t: r for r in self.routes.values() for t in r.inputs}
        where: dict[str, set[int]] = {}
        for qid in selection.ids:
            topic = qid.rpartition("-")[0]
            topic, _, partition = topic.rpartition("-")
            route = by_input.get(topic)
            if route is None or not partition.isdigit():
                return None  # not an id of a configured input (a recheck of another deployment?): look everywhere
            where.setdefault(route.quarantine_topic, set()).add(int(partition))
        return where

    async def scan(self, selection: ReviewFilter | None = None, *,
                   progress: Progress | None = None) -> AsyncGenerator[ReviewItem, None]:
        """The quarantined records matching `selection`, read from the start of the quarantine topics to their
        (committed) end as it was when the scan began, with the decisions held now; nothing is kept."""
        consumer = side_consumer(self.bootstrap, client_id=self.client_id, max_partition_fetch_bytes=SCAN_FETCH_BYTES)
        try:
            await consumer.start()
            only = self._partitions_of(selection)
            tps = [tp for tp in await topic_partitions(consumer, self.quarantine_topics)
                   if only is None or tp.partition in only.get(tp.topic, ())]
            if not tps:
                return
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            starts = {tp: await consumer.position(tp) for tp in tps}
            remaining = {tp: end for tp, end in ends.items() if starts[tp] < end}
            total = sum(end - starts[tp] for tp, end in remaining.items())
            done, deadline = 0, time.monotonic() + SCAN_TIMEOUT
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=200, max_records=SCAN_BATCH)
                for tp, records in batch.items():
                    for rec in records:
                        if rec.offset >= ends[tp]:
                            continue
                        done += 1
                        parsed = parse_quarantined(
                            rec.key, rec.value, rec.headers, topic=rec.topic, partition=rec.partition,
                            offset=rec.offset, timestamp=rec.timestamp / 1000.0 if rec.timestamp else None,
                            default_type=self.default_types)
                        if parsed is None:
                            continue
                        item = self.ledger.review_item(parsed)
                        if selection is None or selection.matches(item):
                            yield item
                for tp, end in list(remaining.items()):
                    if await consumer.position(tp) >= end:
                        del remaining[tp]
                if progress is not None:
                    progress(min(done, total), total)
                if remaining and time.monotonic() > deadline:
                    raise InfrastructureError(f"reading the quarantine did not reach its end within "
                                              f"{SCAN_TIMEOUT:.0f} s (left: {sorted(map(str, remaining))})")
        except KafkaError as exc:
            raise InfrastructureError(f"reading the quarantine failed: {exc}") from exc
        finally:
            await consumer.stop()

    async def page(self, selection: ReviewFilter | None = None, *, offset: int = 0, limit: int = 100,
                   progress: Progress | None = None) -> Page:
        """Summaries of the matching records `offset` to `offset + limit` (newest first), how many match, and
        their counts; offset + limit is at most MAX_WINDOW. Reads the decisions first."""
        offset, limit = max(0, offset), max(0, limit)
        if offset + limit > MAX_WINDOW:
            raise ValueError(f"offset + limit may be at most {MAX_WINDOW}; narrow the filter instead")
        await self.refresh()
        # A min-heap of the newest offset+limit seen: (time, id, arrival, summary); arrival breaks ties.
        window: list[tuple[float, str, int, dict[str, Any]]] = []
        tally, total = Tally(), 0
        async with contextlib.aclosing(self.scan(selection, progress=progress)) as items:
            async for item in items:
                total += 1
                tally.add(item)
                rank = (item.record.time or 0.0, item.record.quarantine_id, total)
                if len(window) < offset + limit:
                    heapq.heappush(window, (*rank, item_summary(item, text=SUMMARY_TEXT)))
                elif window and rank > window[0][:3]:
                    heapq.heapreplace(window, (*rank, item_summary(item, text=SUMMARY_TEXT)))
        newest = [entry[3] for entry in sorted(window, key=lambda e: e[:3], reverse=True)]
        return Page(total=total, offset=offset, limit=limit, records=newest[offset:offset + limit],
                    counts=tally.as_dict())

    async def find(self, qid: str) -> ReviewItem | None:
        """One quarantined record with its decisions (the last copy when it was quarantined twice), or None."""
        await self.refresh()
        found = None
        async with contextlib.aclosing(self.scan(ReviewFilter(ids=frozenset({qid})))) as items:
            async for item in items:
                found = item
        return found

    # ------------------------------------------------------------------ writing

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[AIOKafkaProducer]:
        """Hold the deployment's review fence: a fresh transactional producer, then the state read after it."""
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, transactional_id=self.transactional_id,
                                    enable_idempotence=True, acks="all", client_id=self.client_id)
        try:
            if not self._decisions_topic_ready:
                await self.ensure_decisions_topic()  # before the first write, which would auto-create it wrongly
                self._decisions_topic_ready = True
            await producer.start()  # InitProducerId: fences the previous holder, aborts its open transaction
            await self.refresh()
            yield producer
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()
            # A fenced transaction fails every send in flight with the error we raise once; mark them read.
            for future in self._in_flight:
                future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._in_flight.clear()

    async def _send(self, producer: AIOKafkaProducer, topic: str, **record: Any) -> asyncio.Future[Any]:
        """Send inside the current transaction; the future resolves to the record's metadata."""
        future: asyncio.Future[Any] = await producer.send(topic, **record)
        self._in_flight.append(future)
        return future

    async def _fenced_retry(self, what: str, attempt: Callable[[], Any]) -> Any:
        last, failures = "", 0
        try:
            for n in range(WRITE_ATTEMPTS):
                try:
                    async with self._write_lock:
                        return await attempt()
                except KafkaError as exc:  # fenced by another holder, or the broker: take the fence again
                    failures += 1
                    last = f"{type(exc).__name__}: {exc}"
                    log.warning("review %s: %s (attempt %d of %d)", what, last, n + 1, WRITE_ATTEMPTS)
                # Back off long enough for the holder that fenced us to finish; jitter keeps two apart.
                await asyncio.sleep(min(5.0, random.uniform(0.1, 0.4) * 2**n))
            raise InfrastructureError(f"review {what} failed after {WRITE_ATTEMPTS} attempts: {last}")
        finally:
            if failures:
                _collect_failed_producers()

    async def _partition_for(self, producer: AIOKafkaProducer, topic: str, wanted: int) -> int | None:
        partitions = await producer.partitions_for(topic)
        return wanted if wanted in partitions else None

    async def decide(self, selection: ReviewFilter, action: Action, *, reviewer: str, note: str = "",
                     progress: Progress | None = None) -> ActionReport:
        """Record approve / reject / recheck for every selected record (one transaction); recheck also re-sends."""
        if action not in (Action.APPROVE, Action.REJECT, Action.RECHECK):
            raise ValueError(f"{action} is not a review action")

        # A bulk action writes DECIDE_CHUNK records per transaction: when an attempt fails after some of them
        # committed, the next one skips what is done (it is in `applied`), and the report says what happened.
        report = ActionReport(action.value)

        async def attempt() -> ActionReport:
            report.unchanged.clear()
            report.refused.clear()
            done = set(report.applied)
            async with self._exclusive() as producer:
                found: set[str] = set()
                todo: list[ReviewItem] = []
                async with contextlib.aclosing(self.scan(selection)) as items:
                    async for item in items:
                        found.add(item.record.quarantine_id)
                        if item.record.quarantine_id in done:
                            continue
                        verdict, why = plan(item.status, action)
                        if item.record.is_stub and action is not Action.REJECT:
                            verdict, why = Plan.REFUSED, (
                                "a stub for a record too large to copy (output.too_large): read the original at "
                                f"{item.record.original_topic}[{item.record.original_partition}]"
                                f"@{item.record.original_offset}")
                        if verdict is Plan.REFUSED:
                            report.refused.append((item.record.quarantine_id, why))
                        elif verdict is Plan.UNCHANGED:
                            report.unchanged.append((item.record.quarantine_id, why))
                        elif action is not Action.RECHECK or self._recheckable(item, report):
                            todo.append(item)
                        if len(todo) >= DECIDE_CHUNK:
                            await self._decide_chunk(producer, todo, action, reviewer, note, report, progress)
                            todo = []
                if todo:
                    await self._decide_chunk(producer, todo, action, reviewer, note, report, progress)
                for qid in sorted((selection.ids or frozenset()) - found):
                    report.refused.append((qid, "no such quarantine id (or it does not match the filter)"))
            return report

        result: ActionReport = await self._fenced_retry(action.value, attempt)
        return result

    async def _decide_chunk(self, producer: AIOKafkaProducer, todo: Sequence[ReviewItem], action: Action,
                            reviewer: str, note: str, report: ActionReport, progress: Progress | None) -> None:
        """One transaction: the decisions of `todo` (and, for recheck, the re-sent records)."""
        writes = []
        async with producer.transaction():
            targets = await self._resend(producer, todo) if action is Action.RECHECK else {}
            for item in todo:
                rec = item.record
                entry = DecisionEntry(action, reviewer, time.time(), note, target=targets.get(rec.quarantine_id, ""))
                decision = new_decision(item.decision, entry, quarantine_id=rec.quarantine_id, route=rec.route)
                await self._send(producer, self.decisions_topic, key=rec.quarantine_id.encode(),
                                 value=decision.to_bytes())
                writes.append(decision)
        for decision in writes:
            self.ledger.add_decision(decision.quarantine_id.encode(), decision.to_bytes())
            report.applied.append(decision.quarantine_id)
            target = decision.latest.target
            if target:
                report.delivered.append((decision.quarantine_id, target))
        if progress is not None:
            progress(len(report.applied), len(report.applied))

    def _recheckable(self, item: ReviewItem, report: ActionReport) -> bool:
        route = self.routes.get(item.record.route)
        if route is None:
            report.refused.append((item.record.quarantine_id, f"route {item.record.route!r} is not configured"))
            return False
        if item.record.original_topic not in route.inputs:
            report.refused.append((item.record.quarantine_id, f"original topic {item.record.original_topic!r} "
                                   f"is not an input of route {route.name!r}"))
            return False
        return True

    async def _resend(self, producer: AIOKafkaProducer, items: Sequence[ReviewItem]) -> dict[str, str]:
        """Re-send the original records to their input topics (inside the caller's transaction)."""
        futures = []
        for item in items:
            rec = item.record
            partition = await self._partition_for(producer, rec.original_topic, rec.original_partition)
            futures.append(await self._send(producer, rec.original_topic, key=rec.key, value=rec.value,
                                            headers=recheck_headers(rec), partition=partition))
        sent = await asyncio.gather(*futures)
        return {item.record.quarantine_id: _coordinates(md.topic, md.partition, md.offset)
                for item, md in zip(items, sent, strict=True)}

    async def replay(self, selection: ReviewFilter | None = None, *, runner: str, batch_size: int = 50,
                     rate: float | None = None, progress: Progress | None = None) -> ActionReport:
        """Deliver every selected approved record to its route's verified topic, exactly once."""
        report = ActionReport(Action.REPLAYED.value)
        done: set[str] = set()

        async def attempt() -> ActionReport:
            async with self._exclusive() as producer:
                total = len(done) + sum(1 for d in self.ledger.decisions.values() if status_of(d) is Status.APPROVED)
                if progress is not None:
                    progress(len(done), total)
                chunk: list[ReviewItem] = []
                async with contextlib.aclosing(self.scan(selection)) as items:
                    async for item in items:
                        if item.status is not Status.APPROVED or item.record.quarantine_id in done:
                            continue
                        if item.record.route not in self.routes:
                            if item.record.quarantine_id not in {q for q, _ in report.refused}:
                                report.refused.append((item.record.quarantine_id,
                                                       f"route {item.record.route!r} is not configured"))
                            continue
                        chunk.append(item)
                        if len(chunk) >= max(1, batch_size):
                            await self._replay_and_record(producer, chunk, runner, report, done, rate)
                            chunk = []
                            if progress is not None:
                                progress(len(done), max(total, len(done)))
                if chunk:
                    await self._replay_and_record(producer, chunk, runner, report, done, rate)
                if progress is not None:
                    progress(len(done), len(done))
            return report

        result: ActionReport = await self._fenced_retry("replay", attempt)
        return result

    async def _replay_and_record(self, producer: AIOKafkaProducer, chunk: Sequence[ReviewItem], runner: str,
                                 report: ActionReport, done: set[str], rate: float | None) -> None:
        began = time.monotonic()
        for decision in await self._replay_chunk(producer, chunk, runner):
            self.ledger.add_decision(decision.quarantine_id.encode(), decision.to_bytes())
            done.add(decision.quarantine_id)
            report.applied.append(decision.quarantine_id)
            report.delivered.append((decision.quarantine_id, decision.latest.target))
        if rate:
            await asyncio.sleep(max(0.0, len(chunk) / rate - (time.monotonic() - began)))

    async def _replay_chunk(self, producer: AIOKafkaProducer, chunk: Sequence[ReviewItem],
                            runner: str) -> list[Any]:
        """One transaction: the records to their verified topics, and a replayed entry for each."""
        async with producer.transaction():
            futures = []
            now = time.time()
            for item in chunk:
                rec = item.record
                assert item.decision is not None
                approval = item.decision.last(Action.APPROVE)
                assert approval is not None
                topic = self.routes[rec.route].verified_topic
                partition = await self._partition_for(producer, topic, rec.original_partition)
                futures.append(await self._send(producer, topic, key=rec.key, value=rec.value, partition=partition,
                                                headers=replay_headers(rec, approval, now=now)))
            sent = await asyncio.gather(*futures)
            writes = []
            for item, md in zip(chunk, sent, strict=True):
                assert item.decision is not None
                decision = item.decision.with_entry(DecisionEntry(
                    Action.REPLAYED, runner, now, target=_coordinates(md.topic, md.partition, md.offset)))
                await self._send(producer, self.decisions_topic, key=item.record.quarantine_id.encode(),
                                 value=decision.to_bytes())
                writes.append(decision)
        return writes
