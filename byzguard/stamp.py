"""Producer side: stamp an event with id, source, type, subject, version, clocks and checksum or MAC.

`Stamper` keeps the producer's Lamport clock, a hybrid logical clock (the wall clock in microseconds, or one
more than the last time when that is not ahead), under a producer instance id of its own: a restarted
process or a second replica of the same source never regresses against the guard's high-water mark. The
result is (key, value, headers) ready for any Kafka client. The guard verifies exactly what this writes
(ENVELOPE.md has the byte-level contract). Checksums and MACs are in the bound form: they cover the
attributes with the data (byzguard.integrity.bound_base).
"""

from __future__ import annotations

import time as _time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final

import orjson

from byzguard.clocks import VectorClock, check_instance, hlc_tick
from byzguard.envelope import (
    CE_CHECKSUM,
    CE_CHECKSUMALG,
    CE_CHECKSUMFORM,
    CE_ENTITYVERSION,
    CE_ID,
    CE_KEYID,
    CE_LAMPORTINSTANCE,
    CE_LAMPORTTIME,
    CE_SOURCE,
    CE_SPECVERSION,
    CE_SUBJECT,
    CE_TIME,
    CE_TYPE,
    CE_VECTORCLOCK,
    CONTENT_TYPE,
)
from byzguard.integrity import BOUND, HMAC_SHA256, SHA256, VALUE_ONLY, Key, bound_base, digest
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


class _Auto(Enum):
    NEW = "new"


NEW_INSTANCE: Final = _Auto.NEW
"""The default instance id of a Stamper: a new random one per Stamper (per process, per replica)."""

InstanceArg = str | None | _Auto
"""What `instance=` takes: a name, None (no instance: one writer per source), or NEW_INSTANCE."""


def new_instance_id() -> str:
    """A random producer instance id (16 hex digits): distinct for every process and replica."""
    return uuid.uuid4().hex[:16]


class Stamper:
    """Stamps events of one source. Not thread-safe: one per producer task.

    `instance` names this writer's Lamport clock (`ce_lamportinstance`): by default a new random id, so that
    replicas and restarts of one source each have a clock of their own; give a stable name (a pod name in a
    StatefulSet) to reuse one high-water mark across restarts, or None for a source with exactly one writer.
    `clock` is the wall clock of the hybrid logical clock (seconds); None makes the Lamport time a plain
    counter from `lamport` (tests and known-answer vectors only: it starts over in every process).
    """

    def __init__(self, source: str, *, algorithm: str = SHA256, key: Key | None = None,
                 lamport: int = 0, instance: InstanceArg = NEW_INSTANCE,
                 clock: Callable[[], float] | None = _time.time, form: str = BOUND) -> None:
        if algorithm == HMAC_SHA256 and key is None:
            raise ValueError("hmac-sha256 needs a key")
        if form not in (BOUND, VALUE_ONLY):
            raise ValueError(f"a Stamper writes the {BOUND!r} form (or the legacy {VALUE_ONLY!r}), not {form!r}")
        self.source = source
        self.algorithm = algorithm
        self.key = key
        self.form = form  # `value-only` only to imitate producers not yet moved to the bound form
        self.lamport = lamport
        self.instance = new_instance_id() if instance is NEW_INSTANCE else \
            None if instance is None else check_instance(instance)
        self.clock = clock

    def _tick(self, use_lamport: bool) -> int | None:
        if not use_lamport:
            return None
        clock = self.clock
        self.lamport = self.lamport + 1 if clock is None else hlc_tick(self.lamport, int(clock() * 1_000_000))
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
            if self.instance is not None:
                headers.append((CE_LAMPORTINSTANCE, self.instance.encode()))
        if vclock is not None:
            headers.append((CE_VECTORCLOCK, vclock.to_header()))
        key_id = self.key.key_id if self.key is not None and self.algorithm == HMAC_SHA256 else None
        covered = value
        if self.form == BOUND:
            headers.append((CE_CHECKSUMFORM, BOUND.encode()))
            covered = self._bound(event_id, type, subject, dict(headers), key_id, value)
        headers.append((CE_CHECKSUMALG, self.algorithm.encode()))
        headers.append((CE_CHECKSUM, digest(self.algorithm, covered, self.key).encode()))
        if key_id is not None:
            headers.append((CE_KEYID, key_id.encode()))
        return Stamped(subject.encode(), value, headers, event_id)

    def _bound(self, event_id: str, type: str, subject: str, attrs: dict[str, bytes], key_id: str | None,
               data: bytes) -> bytes:
        base = bound_base(event_id.encode(), self.source.encode(), type.encode(), subject.encode(), attrs,
                          self.algorithm.encode(), key_id.encode() if key_id is not None else None, data)
        if base is None:
            raise ValueError("an attribute holds a line feed, which the bound form cannot cover")
        return base

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
            if self.instance is not None:
                event["lamportinstance"] = self.instance
        if vclock is not None:
            event["vectorclock"] = vclock.to_header().decode()
        key_id = self.key.key_id if self.key is not None and self.algorithm == HMAC_SHA256 else None
        covered = canonicalize(data)
        if self.form == BOUND:
            event["checksumform"] = BOUND
            attrs = {name: (text.encode() if isinstance(text, str) else b"%d" % text) for name, text in (
                (CE_TIME, event.get("time")), (CE_ENTITYVERSION, version), (CE_LAMPORTTIME, tick),
                ("ce_lamportinstance", event.get("lamportinstance")), (CE_VECTORCLOCK, event.get("vectorclock")),
                (CONTENT_TYPE, event["datacontenttype"])) if text is not None}
            covered = self._bound(event_id, type, subject, attrs, key_id, covered)
        event["checksumalg"] = self.algorithm
        event["checksum"] = digest(self.algorithm, covered, self.key)
        if key_id is not None:
            event["keyid"] = key_id
        event["data"] = data
        return Stamped(subject.encode(), orjson.dumps(event),
                       [(CONTENT_TYPE, b"application/cloudevents+json")], event_id)


def seed_checksum_event(data: Any) -> bytes:
    """The seed article's `{data, checksum}` shape: checksum = SHA-256 hex of the canonical JSON of data."""
    return orjson.dumps({"data": data, "checksum": digest(SHA256, canonicalize(data))})
