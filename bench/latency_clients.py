"""The latency phase's own clients: the paced producer and the reader of the verified topic.

Two kinds, chosen with `--latency-client` (bench/run.py):

- `aiokafka` (the default before 2026-12-08): both are aiokafka clients on the bench's event loop. Each costs the
  bench ~30 µs of Python CPU per event each way, on the same 2 cores as the broker and the worker.
- `confluent`: both are confluent-kafka (librdkafka, a bench-only dependency already used by variant a_ck). The
  producer is called from the same pacing loop (`produce` only queues the record; librdkafka's own thread sends
  it), the reader runs in a thread of its own (librdkafka fetches in its threads, the Python part is the header
  parse; `bench.passthrough_ck.take`: `poll`, then what else is there, never `consume(n, timeout)`, which waits for
  n records or the timeout). Same settings as the aiokafka pair: linger 0, acks all, not idempotent, murmur2
  partitioning of the key (aiokafka's and Java's; librdkafka's default, CRC32, would put the keys on other
  partitions); the reader read_committed for exactly_once variants, its fetch wait `reader_wait_ms`.

The timing is the same for both: a sample is the reader's clock when the fetch that returned the output came back
(one clock reading per fetch) minus the send time the paced producer wrote in the record's SENT_HEADER; and the
output's broker append time (LogAppendTime) minus that send time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench import events
from bench.passthrough_ck import take

CLIENTS = ("aiokafka", "confluent")

Headers = list[tuple[str, bytes]]
#: Called by the reader for each output: (clock when its fetch returned, ns; the send time header or None; the
#: output's broker timestamp, ms).
OnOutput = Callable[[int, bytes | None, int], None]


def sent_header(headers: Iterable[tuple[str, bytes]] | None) -> bytes | None:
    """The SENT_HEADER value of an output, None without one."""
    for k, v in headers or ():
        if k == events.SENT_HEADER:
            return v
    return None


def confluent_configs(bootstrap: str, *, read_committed: bool, reader_wait_ms: int,
                      group: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(producer, reader) librdkafka settings equal to the aiokafka pair's."""
    producer = {
        "bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0, "enable.idempotence": False,
        "partitioner": "murmur2_random",  # aiokafka's (and Java's) placement of a keyed record
        # aiokafka's sender: one produce request in flight per broker, the records sent meanwhile go together in
        # the next. librdkafka's default (1,000,000 in flight) with linger 0 sent a request per record or two: at
        # 9,000 ev/s the broker's extra work put a's p99 at 160 ms against 41 with the aiokafka pair.
        "max.in.flight.requests.per.connection": 1,
        "socket.nagle.disable": True,  # as asyncio's sockets (TCP_NODELAY)
    }
    reader = {
        "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
        "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
        "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        "fetch.wait.max.ms": reader_wait_ms, "fetch.min.bytes": 1,
        "fetch.queue.backoff.ms": 5,  # bench/passthrough_ck.py: the 1000 ms default idles a full local queue
        "socket.nagle.disable": True,
    }
    return producer, reader


class AioClients:
    """The aiokafka pair on the bench's event loop."""

    kind = "aiokafka"

    def __init__(self, bootstrap: str, *, read_committed: bool, reader_wait_ms: int) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                         fetch_max_wait_ms=reader_wait_ms,
                                         isolation_level="read_committed" if read_committed else "read_uncommitted")
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)

    async def start(self) -> None:
        try:
            await self.consumer.start()
            await self.producer.start()
        except BaseException:
            await self.stop()
            raise

    async def send(self, topic: str, value: bytes, key: bytes | None, headers: Headers) -> None:
        await self.producer.send(topic, value, key=key, headers=headers)

    async def flush(self) -> None:
        await self.producer.flush()

    async def read(self, topic: str, partitions: int, on_output: OnOutput, done: Callable[[], bool]) -> None:
        """Read `topic` from its beginning, calling `on_output` for each record, until `done()` after a fetch."""
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            now_ns = time.time_ns()
            for msgs in batch.values():
                for m in msgs:
                    on_output(now_ns, sent_header(m.headers), m.timestamp)
            if done():
                return

    async def stop(self) -> None:
        for client in (self.producer, self.consumer):
            with contextlib.suppress(Exception):  # one that fails to stop (or never started) keeps no other running
                await client.stop()


class ConfluentClients:
    """The confluent-kafka pair: the producer called from the pacing loop, the reader in a thread of its own."""

    kind = "confluent"

    def __init__(self, bootstrap: str, *, read_committed: bool, reader_wait_ms: int) -> None:
        from confluent_kafka import Consumer, Producer

        producer_conf, reader_conf = confluent_configs(
            bootstrap, read_committed=read_committed, reader_wait_ms=reader_wait_ms,
            group=f"bench-latency-reader-{time.time_ns()}")
        self.producer = Producer(producer_conf)
        self.consumer = Consumer(reader_conf)
        self._sends = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failed: list[BaseException] = []

    async def start(self) -> None:
        return None

    async def send(self, topic: str, value: bytes, key: bytes | None, headers: Headers) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers)
                break
            except BufferError:  # librdkafka's local queue is full: let it drain
                await asyncio.sleep(0.001)
                self.producer.poll(0)
        self._sends += 1
        if not self._sends % 64:  # serve the delivery reports now and then (nothing waits for them)
            self.producer.poll(0)

    async def flush(self) -> None:
        left = await asyncio.to_thread(self.producer.flush, 60)
        if left:
            raise RuntimeError(f"{left} records still undelivered after 60 s")

    async def read(self, topic: str, partitions: int, on_output: OnOutput, done: Callable[[], bool]) -> None:
        from confluent_kafka import OFFSET_BEGINNING, KafkaException
        from confluent_kafka import TopicPartition as CkPartition

        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if finished.done():
                return
            if exc is None:
                finished.set_result(None)
            else:
                finished.set_exception(exc)

        def run() -> None:
            consumer = self.consumer
            try:
                consumer.assign([CkPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
                while not self._stop.is_set():
                    msgs = take(consumer, 1000, 0.1)  # consume(1000, 0.1) would wait for 1000
                    now_ns = time.time_ns()
                    for m in msgs:
                        if m.error():
                            raise KafkaException(m.error())
                        on_output(now_ns, sent_header(m.headers()), m.timestamp()[1])
                    if done():
                        break
                loop.call_soon_threadsafe(settle, None)
            except BaseException as exc:  # reported to the awaiting side
                self.failed.append(exc)
                loop.call_soon_threadsafe(settle, exc)

        self._thread = threading.Thread(target=run, name="bench-latency-reader", daemon=True)
        self._thread.start()
        try:
            await finished
        finally:
            self._stop.set()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)
        try:
            await asyncio.to_thread(self.producer.flush, 5)
        finally:
            if self._thread is None or not self._thread.is_alive():
                self.consumer.close()


def clients(kind: str, bootstrap: str, *, read_committed: bool, reader_wait_ms: int) -> AioClients | ConfluentClients:
    """The latency phase's producer and reader of `kind` (CLIENTS)."""
    if kind == "aiokafka":
        return AioClients(bootstrap, read_committed=read_committed, reader_wait_ms=reader_wait_ms)
    if kind == "confluent":
        return ConfluentClients(bootstrap, read_committed=read_committed, reader_wait_ms=reader_wait_ms)
    raise ValueError(f"unknown latency client {kind!r}; known: {', '.join(CLIENTS)}")
