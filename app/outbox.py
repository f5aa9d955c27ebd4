"""The outbox: every record the verify agents write (verified, quarantine, receipts, state changelogs) goes
to Kafka a batch at a time, straight into aiokafka's record batches.

Faust's `topic.send` wraps each record in a FutureMessage and a PendingMessage, looks the producer up through
a stampede wrapper, fires sensors and resolves a future with callbacks per record; aiokafka's `send` adds a
coroutine chain and a future per record again (bench/results/profile.md: more of faust's per-record machinery
than byzguard's own work). Here a record is appended to the open `BatchBuilder` of its destination (and, under
exactly_once, of the transaction it belongs to) and one future covers a whole batch.

When a batch goes out (`wake` asks the sender task, which runs whenever the agent awaits; nothing here blocks
the agent but back pressure):
- it is full (aiokafka's batch size);
- its oldest record waited `LINGER` seconds, once the agent has nothing more to process right now (its input
  queue is empty) or while it stays busy. Under a steady but light load a batch so carries a few milliseconds of
  events: sent at once when the queue ran empty, each event took a produce request of its own, and aiokafka's
  sender was 15% of the worker's time at 1,058 events/s (bench/results/profile.md, "Latency");
- before every offset commit (`flush`, under the processing lock, app/eos.py): a commit's offsets never go
  before the records of the events they cover are delivered.

A batch that is not delivered fails the outbox for good: that flush and every later one raise, as do `add` and
`wake`, so no commit (the one at shutdown included) passes the events whose records were lost, the worker stops
loudly and Kafka redelivers them. A broker outage is waited out: aiokafka retries a batch until the producer's
request timeout (faust's `producer_request_timeout`), and a flush waits as long, logging while it waits.

Sizes: `limit(topic)` is the destination's `max.message.bytes` (read from the broker at `start`). The agents
decide before adding whether a record fits (byzguard.routing `record_size`); the outbox refuses one that does
not (`RecordTooLargeError`) instead of letting the broker fail its batch.

Order: the records of one destination partition go out in the order they were added (one sender at a time,
batches sent in the order they were opened). Under exactly_once each batch goes through the transactional
producer of the input partition whose event caused it (changelog records: their own partition's), so it
commits or aborts with that partition's offsets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import faust
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from faust.types import TP

from app import eos
from byzguard.routing import record_size

log = logging.getLogger(__name__)

#: How long a record may wait for its batch to fill while the agent is busy (seconds).
LINGER = 0.005

#: Full batches waiting for the sender at which the agent waits for it (back pressure, ~16 KB each).
MAX_FULL = 64

#: How often a flush that waits for delivery (a broker outage) says so in the log.
WAIT_LOG_INTERVAL = 10.0

#: A topic's message size limit when the broker does not say (Kafka's default `message.max.bytes`).
DEFAULT_LIMIT = 1_048_588

#: Records at least this long are measured against their destination's limit when added.
MEASURE_FROM = 16 * 1024

Headers = Sequence[tuple[str, bytes]]


class RecordTooLargeError(ValueError):
    """A record does not fit its destination topic (`max.message.bytes`); callers check `fits` first."""


class _Batch:
    """One open or full record batch for one destination partition (and transaction)."""

    __slots__ = ("builder", "count", "partition", "producer", "tid", "topic")

    def __init__(self, producer: Any, tid: str | None, topic: str, partition: int) -> None:
        self.producer = producer
        self.tid = tid
        self.topic = topic
        self.partition = partition
        self.builder = producer.create_batch()
        self.count = 0


class Outbox:
    """Records waiting to be sent, batched per destination partition; see the module doc for when they go."""

    def __init__(self, app: faust.App, *, linger: float = LINGER, max_full: int = MAX_FULL,
                 bootstrap: str | None = None) -> None:
        self.app = app
        self.bootstrap = bootstrap or ",".join(f"{url.host}:{url.port or 9092}" for url in app.conf.broker)
        #: Destination topic -> its max.message.bytes (see `load_limits`).
        self.limits: dict[str, int] = {}
        self.linger = linger
        self.max_full = max_full
        self._open: dict[tuple[str | None, str, int], _Batch] = {}
        self._full: list[_Batch] = []
        self._oldest: float | None = None  # time.monotonic() of the oldest record not yet handed to the sender
        self._sent: list[tuple[_Batch, asyncio.Future[Any]]] = []
        self._lock = asyncio.Lock()  # one sender at a time: per partition, batches go out in order
        self._wake = asyncio.Event()
        self._failed: BaseException | None = None
        self._tids: dict[tuple[str, int, TP | None], str | None] = {}
        self._exactly_once = eos.state_of(app) is not None

    # -- adding -----------------------------------------------------------------------------------------------

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
            headers: Headers | None = None, *, source: TP | None = None) -> None:
        """Queue one record for `topic`/`partition`. `source`: the input partition whose event it belongs to
        (under exactly_once its transaction); None for a changelog record (its own partition's transaction)."""
        if self._failed is not None:
            raise self._failed
        if value is not None and len(value) >= MEASURE_FROM:
            size = record_size(key, value, headers or ())
            if size > self.limit(topic):
                raise RecordTooLargeError(f"a record of {size} bytes for {topic}[{partition}] exceeds the topic's "
                                          f"limit of {self.limit(topic)} bytes (max.message.bytes)")
        tid = self._tid(topic, partition, source) if self._exactly_once else None
        slot = (tid, topic, partition)
        batch = self._open.get(slot)
        if batch is None:
            batch = self._open[slot] = _Batch(self._producer(tid), tid, topic, partition)
        if batch.builder.append(timestamp=None, key=key, value=value, headers=headers or []) is None:
            # Full: hand it to the sender, start the next one (a first record always fits, however large).
            self._full.append(batch)
            batch = self._open[slot] = _Batch(batch.producer, tid, topic, partition)
            batch.builder.append(timestamp=None, key=key, value=value, headers=headers or [])
            self._wake.set()
        batch.count += 1
        if self._oldest is None:
            self._oldest = time.monotonic()

    @property
    def transactional(self) -> bool:
        """True under exactly_once: every record goes out in the transaction of its input partition."""
        return self._exactly_once

    def limit(self, topic: str) -> int:
        """The largest record batch `topic` takes (its max.message.bytes; DEFAULT_LIMIT when not loaded)."""
        return self.limits.get(topic, DEFAULT_LIMIT)

    def fits(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> bool:
        """True when the record, alone in a batch, is within `topic`'s limit."""
        return record_size(key, value, headers or ()) <= self.limit(topic)

    @property
    def pending(self) -> bool:
        """True while some record waits to be handed to the sender."""
        return self._oldest is not None

    def due(self) -> bool:
        """True when a batch is full or the oldest waiting record lingered long enough."""
        oldest = self._oldest
        return bool(self._full) or (oldest is not None and time.monotonic() - oldest >= self.linger)

    async def wake(self) -> None:
        """Let the sender (`run`) send everything added so far; wait only if it is too far behind."""
        if self._failed is not None:
            raise self._failed
        self._wake.set()
        if len(self._full) > self.max_full:
            await self._send_all()

    # -- commit ------------------------------------------------------------------------------------------------

    async def flush(self) -> dict[tuple[str, int], int]:
        """Send everything added so far and wait until it is delivered; return, per destination partition
        that got records since the last flush, the offset of its last record. Raises if one was not delivered,
        and so does every later flush: records that were lost are never committed past.

        While the broker does not take the records (an outage) this waits, as long as aiokafka retries them,
        and says so in the log every WAIT_LOG_INTERVAL seconds."""
        task = asyncio.ensure_future(self._flush())
        started = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=WAIT_LOG_INTERVAL)
                if done:
                    break
                log.warning("outbox: waiting %.0f s for the delivery of %d record batches (is the broker away?); "
                            "processing and commits wait", time.monotonic() - started, len(self._sent))
        except BaseException:
            task.cancel()
            raise
        if time.monotonic() - started >= WAIT_LOG_INTERVAL:
            log.warning("outbox: delivered after %.0f s; processing goes on", time.monotonic() - started)
        return task.result()

    async def _flush(self) -> dict[tuple[str, int], int]:
        await self._send_all()
        last: dict[tuple[str, int], int] = {}
        for batch, fut in self._sent:
            if not fut.done():
                await asyncio.wait([fut])
            try:
                offset = int(fut.result().offset) + batch.count - 1
            except BaseException as exc:
                if self._failed is None:
                    log.error("outbox: %d records for %s[%d] were not delivered: %r; nothing is committed past "
                              "them and the worker stops", batch.count, batch.topic, batch.partition, exc)
                    self._failed = exc
                raise
            dest = (batch.topic, batch.partition)
            if last.get(dest, -1) < offset:
                last[dest] = offset
        self._sent = []
        return last

    async def start(self, topics: Sequence[str] = ()) -> None:
        """Make sure the producer runs (the first `add` needs it) and know the size limits of `topics`."""
        await self.app.producer.maybe_start()
        missing = [t for t in topics if t not in self.limits]
        if missing:
            self.limits.update(await load_limits(self.bootstrap, missing))

    # -- sending -----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """The sender: sends whatever `wake` asks for, for as long as the worker runs (an app task). A failure
        is raised by the next `add`, `wake` or `flush`, so the agent and the commit stop the worker loudly."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                oldest = self._oldest
                if not self._full and oldest is not None:
                    # Not full yet: give the batches until the oldest record lingered, as a producer's linger.ms.
                    wait = oldest + self.linger - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                await self._send_all()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the agent and the commit raise it: the worker stops, loudly
            log.exception("outbox: sending failed")
            self._failed = exc

    async def _send_all(self) -> None:
        async with self._lock:
            if self._failed is not None:
                raise self._failed
            batches, self._full = self._full, []
            batches.extend(self._open.values())
            self._open = {}
            self._oldest = None
            for batch in batches:
                fut = await self._send(batch)
                if fut is not None:
                    self._sent.append((batch, fut))

    async def _send(self, batch: _Batch) -> asyncio.Future[Any] | None:
        if batch.tid is None:
            fut: asyncio.Future[Any] = await batch.producer.send_batch(batch.builder, batch.topic,
                                                                      partition=batch.partition)
            return fut
        producer: Any = self.app.producer
        lock = producer._trn_locks.get(batch.tid)
        if lock is None or producer._transaction_producers.get(batch.tid) is not batch.producer:
            # The partition was revoked and its transaction ended: its uncommitted events go to the new owner.
            log.warning("outbox: %d records for %s[%d] dropped with the aborted transaction %s",
                        batch.count, batch.topic, batch.partition, batch.tid)
            return None
        async with lock:
            fut = await batch.producer.send_batch(batch.builder, batch.topic, partition=batch.partition)
            return fut

    # -- producers ---------------------------------------------------------------------------------------------

    def _tid(self, topic: str, partition: int, source: TP | None) -> str | None:
        key = (topic, partition, source)
        try:
            return self._tids[key]
        except KeyError:
            tid = self._tids[key] = eos.transactional_id(self.app, topic, partition, source=source)
            return tid

    def _producer(self, tid: str | None) -> Any:
        producer: Any = self.app.producer
        if tid is None:
            return producer._ensure_producer()
        found = producer._transaction_producers.get(tid)
        if found is None:
            raise RuntimeError(f"no transactional producer {tid!r}: its partition is not assigned to this worker")
        return found


async def load_limits(bootstrap: str, topics: Sequence[str], *, retry_for: float = 120.0) -> dict[str, int]:
    """Each existing topic's `max.message.bytes` (its own setting, else the broker's `message.max.bytes`); a topic
    that does not exist is left out. A broker that does not answer is waited for up to `retry_for` seconds."""
    deadline = time.monotonic() + retry_for
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            wanted = [t for t in dict.fromkeys(topics) if t in existing]
            if not wanted:
                return {}
            responses = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, t, {"max.message.bytes": None}) for t in wanted])
            return _limits_of(responses)
        except Exception as exc:  # a broker outage is waited out, not crashed on
            if time.monotonic() > deadline:
                raise
            log.warning("outbox: cannot read topic limits from %s (%r); retrying", bootstrap, exc)
            await asyncio.sleep(2)
        finally:
            await admin.close()


def _limits_of(responses: Sequence[Any]) -> dict[str, int]:
    limits: dict[str, int] = {}
    for response in responses:
        for resource in response.to_object().get("resources", []):
            if resource.get("error_code", 0):
                continue
            for entry in resource.get("config_entries", []):
                if entry.get("config_names") == "max.message.bytes" and entry.get("config_value"):
                    limits[resource["resource_name"]] = int(entry["config_value"])
    return limits
