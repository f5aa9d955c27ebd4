"""GuardedProducer: a few lines for a Python service to send stamped events with aiokafka (`byzguard[client]`)."""

from __future__ import annotations

import asyncio
import time as _time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from byzguard.clocks import VectorClock
from byzguard.integrity import SHA256, Key
from byzguard.stamp import NEW_INSTANCE, InstanceArg, Stamped, Stamper


@dataclass(frozen=True)
class Receipt:
    """byzguard's verdict on one event: outcome (verified, warned, quarantined, ...) and reasons."""

    event_id: str
    outcome: str
    reasons: list[dict[str, str]]
    latency_s: float

    @property
    def visible(self) -> bool:
        """True when consumers of the verified topic can now read the event."""
        return self.outcome in ("verified", "warned", "suspect")


class ReceiptTimeout(TimeoutError):
    """No verdict arrived in time: the write may or may not be visible yet."""


class ReceiptsTopicMissing(LookupError):
    """The receipts topic does not exist, so no verdict could ever be read: nothing was sent."""


class GuardedProducer:
    """Stamps every event (id, clocks, version, checksum or MAC) and sends it keyed by entity id.

    async with GuardedProducer("127.0.0.1:9092", source="pricing") as producer:
        await producer.send("prices", {"price": 49.99}, type="price.updated", subject="sku-1", version=7)

    Its Lamport clock is a hybrid logical clock under a random instance id of its own (byzguard.stamp.Stamper),
    so restarts and replicas of one source need no setup; `instance=` names it instead.
    """

    def __init__(self, bootstrap_servers: str, *, source: str, algorithm: str = SHA256,
                 key: Key | None = None, structured: bool = False, instance: InstanceArg = NEW_INSTANCE,
                 **producer_options: Any) -> None:
        self.stamper = Stamper(source, algorithm=algorithm, key=key, instance=instance)
        self.structured = structured
        options = {"acks": "all", "enable_idempotence": True, "linger_ms": 5, **producer_options}
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, **options)

    async def __aenter__(self) -> GuardedProducer:
        await self._producer.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._producer.stop()

    def stamp(self, data: Any, *, type: str, subject: str, version: int | None = None,
              time: float | None = None, vclock: VectorClock | None = None) -> Stamped:
        """Stamp without sending (for tests and for custom transports)."""
        make = self.stamper.structured if self.structured else self.stamper.binary
        return make(data, type=type, subject=subject, version=version, time=time, vclock=vclock)

    async def send(self, topic: str, data: Any, *, type: str, subject: str, version: int | None = None,
                   time: float | None = None, vclock: VectorClock | None = None) -> str:
        """Stamp and send one event; returns its event id once the broker has acknowledged it."""
        stamped = self.stamp(data, type=type, subject=subject, version=version, time=time, vclock=vclock)
        await self._producer.send_and_wait(topic, stamped.value, key=stamped.key, headers=stamped.headers)
        return stamped.event_id

    async def send_stamped(self, topic: str, stamped: Stamped) -> None:
        """Send an already stamped record without waiting for its acknowledgement."""
        await self._producer.send(topic, stamped.value, key=stamped.key, headers=stamped.headers)

    async def flush(self) -> None:
        """Wait until every pending record is acknowledged."""
        await self._producer.flush()

    async def send_confirmed(self, topic: str, data: Any, *, type: str, subject: str, receipts_topic: str,
                             version: int | None = None, time: float | None = None,
                             vclock: VectorClock | None = None, timeout: float = 10.0) -> Receipt:
        """Send one event and wait for byzguard's verdict on it (the seed's verifiedWrite).

        The receipt is read from the route's receipts topic with read_committed, so it is visible exactly
        when the verified record is: the same path consumers use. Raises ReceiptTimeout after `timeout`, and
        ReceiptsTopicMissing at once (before sending) when the receipts topic does not exist.
        """
        started = _time.perf_counter()
        stamped = self.stamp(data, type=type, subject=subject, version=version, time=time, vclock=vclock)
        consumer = AIOKafkaConsumer(bootstrap_servers=self._producer.client._bootstrap_servers, group_id=None,
                                    enable_auto_commit=False, isolation_level="read_committed")
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(receipts_topic) or set()
            # A topic created a moment ago may not be in every broker's metadata yet: look for up to 2 s.
            patience = asyncio.get_running_loop().time() + min(2.0, timeout)
            while not partitions:
                await consumer._client.force_metadata_update()
                partitions = consumer.partitions_for_topic(receipts_topic) or set()
                if partitions or asyncio.get_running_loop().time() > patience:
                    break
                await asyncio.sleep(0.2)
            if not partitions:
                raise ReceiptsTopicMissing(
                    f"receipts topic {receipts_topic!r} does not exist, so no verdict could be read; nothing was "
                    f"sent. Set `receipts_topic: {receipts_topic}` on the byzguard route whose inputs include "
                    f"{topic!r} (byzguard.yaml): the worker creates the topic when it starts")
            tps = [TopicPartition(receipts_topic, p) for p in sorted(partitions)]
            # Positions taken before the send: the receipt can only come after them.
            start = await consumer.end_offsets(tps) if tps else {}
            meta = await self._producer.send_and_wait(topic, stamped.value, key=stamped.key,
                                                      headers=stamped.headers)
            tp = TopicPartition(receipts_topic, meta.partition)
            consumer.assign([tp])
            consumer.seek(tp, start.get(tp, 0))
            deadline = asyncio.get_running_loop().time() + timeout
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                batch = await consumer.getmany(tp, timeout_ms=int(min(left, 0.5) * 1000))
                for record in batch.get(tp, []):
                    if record.key == stamped.key_id_bytes:
                        body = orjson.loads(record.value)
                        if body["outcome"] == "held":
                            continue  # waiting for its causal dependencies; the final verdict follows
                        return Receipt(stamped.event_id, body["outcome"], body["reasons"],
                                       _time.perf_counter() - started)
            raise ReceiptTimeout(f"no verdict on event {stamped.event_id} within {timeout:g}s")
        finally:
            await consumer.stop()
