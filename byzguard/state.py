"""Per-entity and per-source state, as one compact record each (every table write is a changelog message)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import orjson

from byzguard.clocks import VectorClock


@dataclass(frozen=True, slots=True)
class SeenId:
    """An event id recently verified for the entity, with its content fingerprint, its entity version and when it
    was seen. `version` is None for an event without one, and for an entry written before versions were kept."""

    event_id: str
    content_hash: bytes
    seen_at: float
    version: int | None = None


@dataclass(frozen=True, slots=True)
class EntityState:
    """What the guard knows of one entity: its last verified version, clock, content and recent ids."""

    version: int | None
    vclock: VectorClock | None
    content_hash: bytes
    last_good: bytes
    last_good_type: str
    verified_at: float
    event_time: float | None
    recent: tuple[SeenId, ...] = ()

    def to_bytes(self) -> bytes:
        """Serialize for the state table."""
        return orjson.dumps([
            1,
            self.version,
            self.vclock.to_header().decode() if self.vclock is not None else None,
            self.content_hash.hex(),
            # latin-1 maps every byte to one code point, so arbitrary binary values survive JSON.
            self.last_good.decode("latin-1"),
            self.last_good_type,
            self.verified_at,
            self.event_time,
            [[s.event_id, s.content_hash.hex(), s.seen_at, s.version] for s in self.recent],
        ])

    @classmethod
    def from_bytes(cls, raw: bytes) -> EntityState:
        """Deserialize a state table value."""
        _v, version, vclock, chash, last_good, last_type, verified_at, event_time, recent = orjson.loads(raw)
        # Positional, in field order: this runs for every event of a known entity.
        return cls(
            version,
            # The merged clock of an entity may outgrow the per-event bound; state is trusted, so no bound here.
            VectorClock.from_header(vclock, max_entries=sys.maxsize) if vclock is not None else None,
            bytes.fromhex(chash),
            last_good.encode("latin-1"),
            last_type,
            verified_at,
            event_time,
            # Entries written before versions were kept have three fields.
            tuple([SeenId(e[0], bytes.fromhex(e[1]), e[2], e[3] if len(e) > 3 else None) for e in recent]),
        )

    def last_good_data(self) -> object:
        """The last verified data parsed as JSON, or None when it was not JSON."""
        try:
            return orjson.loads(self.last_good)
        except orjson.JSONDecodeError:
            return None

    def find(self, event_id: str, now: float, window: float) -> SeenId | None:
        """The recent entry for `event_id` still inside the idempotency window, if any."""
        for seen in self.recent:
            if seen.event_id == event_id and now - seen.seen_at <= window:
                return seen
        return None


def encode_lamport(value: int) -> bytes:
    """A per-source Lamport high-water mark as table bytes."""
    return str(value).encode()


def decode_lamport(raw: bytes | None) -> int | None:
    """Inverse of encode_lamport; None when the source has no mark yet."""
    return int(raw) if raw else None
