"""Producer side: stamp an event with id, source, type, subject, version, clocks and checksum or MAC.

`Stamper` keeps the producer's Lamport clock; the result is (key, value, headers) ready for any Kafka
client. The guard verifies exactly what this writes (ENVELOPE.md has the byte-level contract).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from byzguard.clocks import VectorClock
from byzguard.envelope import (
    CE_CHECKSUM,
    CE_CHECKSUMALG,
    CE_ENTITYVERSION,
    CE_ID,
    CE_KEYID,
    CE_LAMPORTTIME,
    CE_SOURCE,
    CE_SPECVERSION,
    CE_SUBJECT,
    CE_TIME,
    CE_TYPE,
    CE_VECTORCLOCK,
    CONTENT_TYPE,
)
from byzguard.integrity import HMAC_SHA256, SHA256, Key, digest
from byzguard.jcs import canonicalize
from byzguard.routing import receipt_key


@dataclass(frozen=True, slots=True)
class Stamped:
    """A record ready to send: key = entity id, value and headers."""

    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    event_id: str

    @property
    def key_id_bytes(self) -> bytes:
        """The key of its receipt: the event id as bytes, or its SHA-256 when the id is long (byzguard.routing
        `receipt_key`)."""
        return receipt_key(self.event_id)


def rfc3339(epoch: float) -> str:
    """Epoch seconds as RFC 3339 UTC with milliseconds, as ce_time carries it."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Stamper:
    """Stamps events of one source. Not thread-safe: one per producer task."""

    def __init__(self, source: str, *, algorithm: str = SHA256, key: Key | None = None,
                 lamport: int = 0) -> None:
        if algorithm == HMAC_SHA256 and key is None:
            raise ValueError("hmac-sha256 needs a key")
        self.source = source
        self.algorithm = algorithm
        self.key = key
        self.lamport = lamport

    def _tick(self, use_lamport: bool) -> int | None:
        if not use_lamport:
            return None
        self.lamport += 1
        return self.lamport

    def binary(self, data: Any, *, type: str, subject: str, version: int | None = None,
               time: float | None = None, vclock: VectorClock | None = None, lamport: bool = True,
               event_id: str | None = None) -> Stamped:
        """CloudEvents binary mode: value = data as JSON bytes (or the bytes given), attributes in headers."""
        value = data if isinstance(data, bytes) else orjson.dumps(data)
        event_id = event_id or str(uuid.uuid4())
        headers: list[tuple[str, bytes]] = [
            (CE_SPECVERSION, b"1.0"), (CE_ID, event_id.encode()), (CE_SOURCE, self.source.encode()),
            (CE_TYPE, type.encode()), (CE_SUBJECT, subject.encode()), (CONTENT_TYPE, b"application/json"),
        ]
        if time is not None:
            headers.append((CE_TIME, rfc3339(time).encode()))
        if version is not None:
            headers.append((CE_ENTITYVERSION, str(version).encode()))
        tick = self._tick(lamport)
        if tick is not None:
            headers.append((CE_LAMPORTTIME, str(tick).encode()))
        if vclock is not None:
            headers.append((CE_VECTORCLOCK, vclock.to_header()))
        headers.append((CE_CHECKSUMALG, self.algorithm.encode()))
        headers.append((CE_CHECKSUM, digest(self.algorithm, value, self.key).encode()))
        if self.key is not None and self.algorithm == HMAC_SHA256:
            headers.append((CE_KEYID, self.key.key_id.encode()))
        return Stamped(subject.encode(), value, headers, event_id)

    def structured(self, data: Any, *, type: str, subject: str, version: int | None = None,
                   time: float | None = None, vclock: VectorClock | None = None, lamport: bool = True,
                   event_id: str | None = None) -> Stamped:
        """CloudEvents structured mode: one JSON object; the checksum covers JCS(data)."""
        event_id = event_id or str(uuid.uuid4())
        event: dict[str, Any] = {"specversion": "1.0", "id": event_id, "source": self.source, "type": type,
                                 "subject": subject, "datacontenttype": "application/json"}
        if time is not None:
            event["time"] = rfc3339(time)
        if version is not None:
            event["entityversion"] = version
        tick = self._tick(lamport)
        if tick is not None:
            event["lamporttime"] = tick
        if vclock is not None:
            event["vectorclock"] = vclock.to_header().decode()
        event["checksumalg"] = self.algorithm
        event["checksum"] = digest(self.algorithm, canonicalize(data), self.key)
        if self.key is not None and self.algorithm == HMAC_SHA256:
            event["keyid"] = self.key.key_id
        event["data"] = data
        return Stamped(subject.encode(), orjson.dumps(event),
                       [(CONTENT_TYPE, b"application/cloudevents+json")], event_id)


def seed_checksum_event(data: Any) -> bytes:
    """The seed article's `{data, checksum}` shape: checksum = SHA-256 hex of the canonical JSON of data."""
    return orjson.dumps({"data": data, "checksum": digest(SHA256, canonicalize(data))})
