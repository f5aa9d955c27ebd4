"""GuardedProducer: a few lines for a Python service to send stamped events with aiokafka."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer

from byzguard.clocks import VectorClock
from byzguard.integrity import SHA256, Key
from byzguard.stamp import Stamped, Stamper


class GuardedProducer:
    """Stamps every event (id, clocks, version, checksum or MAC) and sends it keyed by entity id.

    async with GuardedProducer("127.0.0.1:9092", source="pricing") as producer:
        await producer.send("prices", {"price": 49.99}, type="price.updated", subject="sku-1", version=7)
    """

    def __init__(self, bootstrap_servers: str, *, source: str, algorithm: str = SHA256,
                 key: Key | None = None, structured: bool = False, **producer_options: Any) -> None:
        self.stamper = Stamper(source, algorithm=algorithm, key=key)
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
