"""Outputs collected into aiokafka record batches (`create_batch` / `send_batch`): one future per batch, not
per record. One open batch per destination partition; records of one destination go out in the order added."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from app.runtime.limits import RecordTooLargeError

log = logging.getLogger(__name__)

#: The headers of a record without any (aiokafka only reads them).
_NO_HEADERS: list[tuple[str, bytes]] = []


class RecordBatches:
    """The records of one step of the batched runtime, by destination (topic, partition)."""

    __slots__ = ("full", "open", "producer")

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self.open: dict[tuple[str, int], Any] = {}
        self.full: list[tuple[str, int, Any]] = []

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
            headers: Sequence[tuple[str, bytes]] = ()) -> None:
        # aiokafka's record batch builder takes the headers as a list (a tuple is refused) and keeps none of it:
        # the core's header lists go in as they are, without a copy per record.
        if headers.__class__ is not list:
            headers = list(headers) if headers else _NO_HEADERS
        dest = (topic, partition)
        builder = self.open.get(dest)
        if builder is None:
            builder = self.open[dest] = self.producer.create_batch()
        if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
            self.full.append((topic, partition, builder))
            builder = self.open[dest] = self.producer.create_batch()
            if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
                raise RecordTooLargeError(f"a record for {topic}[{partition}] is larger than a whole record batch")

    def __bool__(self) -> bool:
        return bool(self.open or self.full)

    async def deliver(self) -> dict[tuple[str, int], int]:
        """Send every batch and wait until the broker acknowledged all of them; return, per destination
        partition, the offset of its last record. Raises if one was not delivered."""
        sent = await self.send()
        if sent:
            await asyncio.wait([fut for *_, fut in sent])
        return delivered(sent)

    async def send(self) -> list[Sent]:
        """Hand every batch to the producer; each one's future is done once the broker answered (`delivered`)."""
        batches = [*self.full, *((t, p, b) for (t, p), b in self.open.items())]
        self.full, self.open = [], {}
        return [(t, p, b.record_count(), await self.producer.send_batch(b, t, partition=p)) for t, p, b in batches]


#: One batch handed to the producer: topic, partition, records, the future of its answer.
Sent = tuple[str, int, int, "asyncio.Future[Any]"]


def delivered(sent: list[Sent]) -> dict[tuple[str, int], int]:
    """Of batches whose answers all came: per destination partition, the offset of its last record. Raises if one
    was not delivered."""
    last: dict[tuple[str, int], int] = {}
    for topic, partition, count, fut in sent:
        exc = fut.exception()
        if exc is not None:
            log.error("%d records for %s[%d] were not delivered: %r; nothing is committed past them and the "
                      "worker stops", count, topic, partition, exc)
            raise exc
        offset = int(fut.result().offset) + count - 1
        if last.get((topic, partition), -1) < offset:
            last[(topic, partition)] = offset
    return last
