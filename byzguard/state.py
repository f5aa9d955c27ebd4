"""Per-entity and per-source state, as one compact record each (every table write is a changelog message).

An entity record is packed binary (format 2): a fixed header, the last-known-good value's type, the entity's
vector clock, the last-known-good bytes, then the recent event ids as fixed-width entries of 40 bytes each:
a 128-bit hash of the event id (xxh3-128 of its UTF-8 bytes, so a 100 KB id costs 16 bytes), the first
8 bytes of the event's content hash, the time it was seen (a double) and its entity version (-1: none).
The entries are in the order they were verified, so the ids still inside the idempotency window are a
suffix of them, and a new record reuses that suffix's bytes as they are.

Records of format 1 (an orjson list, written by earlier releases) are read as they are, their ids hashed
on reading, so an id kept by an old record still matches; the next verified event of the entity writes
the record back in format 2.

Bounds: the last-known-good value is kept only up to `last_good_max_bytes` (engine.Limits; a larger value
is dropped and the record says how large it was), the merged vector clock is cut at MERGED_CLOCK_MAX_ENTRIES
entries, and the ids at `idempotency.ids_per_entity`: a record never outgrows those bounds.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Final

import orjson
import xxhash

from byzguard.clocks import VectorClock

FORMAT: Final = 2
"""The entity record's format version (its first byte); format 1 records start with `[`."""

#: (format, flags, version, verified_at, event_time, content_hash, last_good_dropped, len(type), len(vclock),
#: len(last_good))
_HEADER: Final = struct.Struct("<BBqdd16sIIII")
#: (id hash, content hash prefix, seen_at, version or -1)
_ENTRY: Final = struct.Struct("<16s8sdq")
ENTRY_SIZE: Final = _ENTRY.size
_HAS_VERSION: Final = 1
_HAS_EVENT_TIME: Final = 2
_HAS_VCLOCK: Final = 4
_NO_VERSION: Final = -1
_CONTENT_PREFIX: Final = 8
_SEEN_AT_OFFSET: Final = 24  # where seen_at starts inside an entry
_LEGACY_START: Final = ord("[")

MERGED_CLOCK_MAX_ENTRIES: Final = 256
"""The most entries an entity's merged vector clock keeps (the writers with the highest counters stay)."""

_id_hash = xxhash.xxh3_128_digest
_pack_entry = _ENTRY.pack
_unpack_seen_at = struct.Struct("<d").unpack_from


def id_hash(event_id: str) -> bytes:
    """The 16 bytes an event id is remembered by."""
    return _id_hash(event_id.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class SeenId:
    """An event id recently verified for the entity: the hash of the id, a prefix of its content hash, when it
    was seen and its entity version. `version` is None for an event without one, and for an entry written
    before versions were kept."""

    id_hash: bytes
    content_hash: bytes
    seen_at: float
    version: int | None = None

    def same_content(self, content_hash: bytes) -> bool:
        """Whether `content_hash` (a full content hash) is the content this id was seen with."""
        return content_hash[:_CONTENT_PREFIX] == self.content_hash


# Not frozen: a frozen dataclass's __init__ costs about 1 µs more, and one or two are built per event.
# Treat it as immutable all the same.
@dataclass(slots=True)
class EntityState:
    """What the guard knows of one entity: its last verified version, clock and content, its last-known-good
    value (with when that value was verified and its event time) and its recent ids (packed entries).

    `last_good_dropped` is the size of the last verified value when it was too large to keep (last_good is
    then empty); 0 otherwise.
    """

    version: int | None
    vclock: VectorClock | None
    content_hash: bytes
    last_good: bytes
    last_good_type: str
    verified_at: float
    event_time: float | None
    entries: bytes = b""
    last_good_dropped: int = 0

    @property
    def recent(self) -> tuple[SeenId, ...]:
        """The recent ids, oldest first (for inspection: the checks read the entries as they are)."""
        return tuple(SeenId(h, c, t, None if v == _NO_VERSION else v) for h, c, t, v in
                     _ENTRY.iter_unpack(self.entries))

    def to_bytes(self) -> bytes:
        """Serialize for the state table (format 2)."""
        version, vclock, event_time = self.version, self.vclock, self.event_time
        flags = ((_HAS_VERSION if version is not None else 0) | (_HAS_EVENT_TIME if event_time is not None else 0)
                 | (_HAS_VCLOCK if vclock is not None else 0))
        kind = self.last_good_type.encode("utf-8", "surrogatepass")
        clock = vclock.to_header() if vclock is not None else b""
        last_good = self.last_good
        return b"".join((
            _HEADER.pack(FORMAT, flags, version if version is not None else 0, self.verified_at,
                         event_time if event_time is not None else 0.0, self.content_hash, self.last_good_dropped,
                         len(kind), len(clock), len(last_good)),
            kind, clock, last_good, self.entries,
        ))

    @classmethod
    def from_bytes(cls, raw: bytes) -> EntityState:
        """Deserialize a state table value, of format 2 or of the earlier orjson format."""
        if raw[0] == _LEGACY_START:
            return _from_legacy(raw)
        (fmt, flags, version, verified_at, event_time, content_hash, dropped, kind_len, clock_len,
         last_good_len) = _HEADER.unpack_from(raw)
        if fmt != FORMAT:
            raise ValueError(f"entity record of unknown format {fmt}")
        start = _HEADER.size
        kind = raw[start:start + kind_len].decode("utf-8", "surrogatepass")
        start += kind_len
        vclock = None
        if flags & _HAS_VCLOCK:
            vclock = _clock(raw[start:start + clock_len])
        start += clock_len
        last_good = raw[start:start + last_good_len]
        start += last_good_len
        return cls(version if flags & _HAS_VERSION else None, vclock, content_hash, last_good, kind, verified_at,
                   event_time if flags & _HAS_EVENT_TIME else None, raw[start:], dropped)

    def last_good_data(self) -> object:
        """The last verified data parsed as JSON, or None when it was not JSON (or was not kept)."""
        try:
            return orjson.loads(self.last_good)
        except orjson.JSONDecodeError:
            return None

    def find(self, event_id: str, now: float, window: float) -> SeenId | None:
        """The recent entry for `event_id` still inside the idempotency window, if any."""
        entries = self.entries
        if not entries:
            return None
        wanted = id_hash(event_id)
        at = entries.find(wanted)
        while at >= 0:
            if at % ENTRY_SIZE == 0:
                h, content, seen_at, version = _ENTRY.unpack_from(entries, at)
                if now - seen_at <= window:
                    return SeenId(h, content, seen_at, None if version == _NO_VERSION else version)
            at = entries.find(wanted, at + 1)
        return None


def _clock(raw: bytes) -> VectorClock:
    """An entity's clock as to_bytes wrote it (VectorClock.to_header of a valid clock): read without the
    checks an event's header needs. The merged clock has its own bound, not the per-event one."""
    if not raw:
        return VectorClock()
    try:
        return VectorClock._of({node: int(counter) for node, _, counter in
                                (entry.partition("=") for entry in raw.decode().split(","))})
    except ValueError:
        return VectorClock.from_header(raw, max_entries=sys.maxsize)  # names the fault


def new_entries(entries: bytes, event_id: str, content_hash: bytes, seen_at: float, version: int | None, *,
                now: float, window: float, keep: int) -> bytes:
    """`entries` with the ones outside the window (and beyond `keep` in all) dropped, and the new id added."""
    count = len(entries) // ENTRY_SIZE
    first = max(0, count - keep + 1)  # room for the new one
    # Verified in order, so seen_at rises along the entries: the first one inside the window starts the suffix.
    oldest = now - window
    while first < count and _unpack_seen_at(entries, first * ENTRY_SIZE + _SEEN_AT_OFFSET)[0] < oldest:
        first += 1
    return entries[first * ENTRY_SIZE:] + _pack_entry(id_hash(event_id), content_hash[:_CONTENT_PREFIX], seen_at,
                                                      _NO_VERSION if version is None else version)


def bounded_merge(event_clock: VectorClock | None, entity_clock: VectorClock | None) -> VectorClock | None:
    """The entity's next clock: the pointwise maximum, cut to MERGED_CLOCK_MAX_ENTRIES entries (the event's
    own entries always stay; of the others, those with the highest counters)."""
    if entity_clock is None:
        return event_clock
    if event_clock is None:
        return entity_clock
    merged = event_clock.merge(entity_clock)
    if len(merged) <= MERGED_CLOCK_MAX_ENTRIES:
        return merged
    own = event_clock.to_dict()
    others = sorted(((counter, node) for node, counter in merged.to_dict().items() if node not in own), reverse=True)
    room = max(0, MERGED_CLOCK_MAX_ENTRIES - len(own))
    return VectorClock({**own, **{node: counter for counter, node in others[:room]}})


def _from_legacy(raw: bytes) -> EntityState:
    """A format 1 record (an orjson list), with its ids hashed as format 2 keeps them."""
    _v, version, vclock, chash, last_good, last_type, verified_at, event_time, recent = orjson.loads(raw)
    # Entries written before versions were kept have three fields.
    entries = b"".join(_pack_entry(id_hash(e[0]), bytes.fromhex(e[1])[:_CONTENT_PREFIX], e[2],
                                   _NO_VERSION if len(e) < 4 or e[3] is None else e[3]) for e in recent)
    return EntityState(
        version,
        VectorClock.from_header(vclock, max_entries=sys.maxsize) if vclock is not None else None,
        bytes.fromhex(chash),
        # latin-1 maps every byte to one code point, which is how format 1 kept binary values in JSON.
        last_good.encode("latin-1"),
        last_type,
        verified_at,
        event_time,
        entries,
    )


def encode_lamport(value: int) -> bytes:
    """A per-source Lamport high-water mark as table bytes."""
    return str(value).encode()


def decode_lamport(raw: bytes | None) -> int | None:
    """Inverse of encode_lamport; None when the source has no mark yet."""
    return int(raw) if raw else None
