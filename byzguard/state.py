"""Per-entity and per-source state, as one compact record each (every table write is a changelog message).

An entity record is packed binary (format 3): a fixed header, the last-known-good value's type, the entity's
vector clock, the last-known-good bytes, then the recent event ids (`EntityState.entries`):

    flags (1 byte), time base (uint32, whole seconds)
    one 16-byte row per id, oldest first:
        id hash   8 bytes: the first 64 bits of xxh3-128 of the id's UTF-8 bytes (a 100 KB id costs 8)
        content   4 bytes: the first 32 bits of the event's content hash
        seen at   4 bytes: milliseconds after the time base (rows of 20 bytes, with an 8-byte double, when
                  that does not fit)
    the versions, only when they are irregular (8 bytes each, -1: none); otherwise the flags say either
    "no entry has a version" or "consecutive, the newest one the entity's version", the common case of one
    writer whose events are verified in order.

So an id costs 16 bytes (a price entity with 32 ids: about 680 bytes). The entries are in the order they
were verified, so the ids still inside the idempotency window are a suffix, and a new record reuses that
suffix's bytes as they are. A seen-at time is kept to the millisecond: the window is decided on it.

What the short hashes cost, per event (the checks never let an event through on a hash match: a match
means "duplicate" (dropped) or "id reused" (quarantined), never "verified"):
- a new id matching one of the entity's 32 remembered ids by accident: 32 / 2**64, about 2e-18 (one event in
  5e17; a worker at 10,000 events/s for ten years checks 3e12); it is then reported as id.reused, or dropped
  as a duplicate when its 32-bit content prefix also matches (a further 2**-32);
- an id reused for other content whose content prefix matches by accident: 2**-32 per such reuse; it is then
  dropped as a duplicate instead of quarantined as id.reused. Neither hash is meant to stand against a
  producer who crafts collisions (xxh3 is not a cryptographic hash, nor was the 128-bit form before it): a
  producer with a valid key who wants an event dropped can drop it itself.

Records of format 2 (40-byte entries with 128-bit id hashes, which start with the 64 bits kept now) and of
format 1 (an orjson list, from earlier releases) are read as they are; the next verified event of the entity
writes the record back in format 3, keeping the ids.

Bounds: the last-known-good value is kept only up to `last_good_max_bytes` (engine.Limits; a larger value
is dropped and the record says how large it was), the merged vector clock is cut at MERGED_CLOCK_MAX_ENTRIES
entries, and the ids at `idempotency.ids_per_entity`: a record never outgrows those bounds.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import orjson
import xxhash

from byzguard.clocks import VectorClock, remember

FORMAT: Final = 3
"""The entity record's format version (its first byte); format 1 records start with `[`."""

#: (format, flags, version, verified_at, event_time, content_hash, len(type), len(vclock),
#: len(last_good), or the size of the value not kept when _DROPPED)
_HEADER: Final = struct.Struct("<BBqdd16sHHI")
_HEADER_LONG: Final = struct.Struct("<BBqdd16sIII")  # with _LONG_LENGTHS: a type or clock over 64 KB
_HAS_VERSION: Final = 1
_HAS_EVENT_TIME: Final = 2
_HAS_VCLOCK: Final = 4
_DROPPED: Final = 8
_LONG_LENGTHS: Final = 16
_SHORT_MAX: Final = 0xFFFF

# The ids: (flags, time base), the rows, then the versions if explicit.
_IDS_HEAD: Final = struct.Struct("<BI")
_HEAD: Final = _IDS_HEAD.size
_V_NONE: Final = 0       # no entry has a version
_V_SEQ: Final = 1        # consecutive versions, the newest one the entity's version
_V_EXPLICIT: Final = 2   # a version column (-1: none)
_V_MASK: Final = 3
_WIDE_TIME: Final = 4    # seen-at times as doubles (they do not fit milliseconds after a 32-bit base)
ID_BYTES: Final = 8
_CONTENT_PREFIX: Final = 4
_ROW: Final = struct.Struct("<8s4sI")
_ROW_WIDE: Final = struct.Struct("<8s4sd")
ENTRY_SIZE: Final = _ROW.size
"""What one remembered id costs in the common case (consecutive or no versions)."""
_SEEN_AT: Final = ID_BYTES + _CONTENT_PREFIX  # where seen at starts in a row
_NO_VERSION: Final = -1
_MS_MAX: Final = 0xFFFFFFFF
_LEGACY_START: Final = ord("[")

#: Format 2: (format, flags, version, verified_at, event_time, content_hash, last_good_dropped, len(type),
#: len(vclock), len(last_good)); entries of (id hash, content hash prefix, seen_at, version or -1).
_HEADER_2: Final = struct.Struct("<BBqdd16sIIII")
_ENTRY_2: Final = struct.Struct("<16s8sdq")

MERGED_CLOCK_MAX_ENTRIES: Final = 256
"""The most entries an entity's merged vector clock keeps (the writers with the highest counters stay)."""

_id_hash = xxhash.xxh3_128_digest
_new: Final = object.__new__
_head = _IDS_HEAD.unpack_from
_pack_head = _IDS_HEAD.pack
_ms_at = struct.Struct("<I").unpack_from
_pack_row = _ROW.pack
_version_at = struct.Struct("<q").unpack_from


# The last id hashed, by identity: the checks (find) and the next state (new_entries) hash the same event id.
_LAST_ID: list[tuple[object, bytes]] = [(object(), b"")]


def id_hash(event_id: str) -> bytes:
    """The 8 bytes an event id is remembered by."""
    last, digest = _LAST_ID[0]
    if event_id is not last:
        digest = _id_hash(event_id.encode("utf-8", "surrogatepass"))[:ID_BYTES]
        _LAST_ID[0] = (event_id, digest)
    return digest


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


_Item = tuple[bytes, bytes, float, int | None]


def _layout(flags: int, size: int) -> tuple[int, struct.Struct]:
    """(entries, row struct) of an ids blob of `size` bytes."""
    row = _ROW_WIDE if flags & _WIDE_TIME else _ROW
    return (size - _HEAD) // (row.size + (8 if flags & _V_MASK == _V_EXPLICIT else 0)), row


def _items(blob: bytes, version: int | None) -> list[_Item]:
    """Every entry of an ids blob, oldest first, as (id hash, content prefix, seen at, version)."""
    if not blob:
        return []
    flags, base = _head(blob)
    n, row = _layout(flags, len(blob))
    end = _HEAD + row.size * n
    rows = list(row.iter_unpack(blob[_HEAD:end]))
    mode = flags & _V_MASK
    kept: Sequence[int | None]
    if mode == _V_EXPLICIT:
        kept = [None if v == _NO_VERSION else v for v in struct.unpack_from(f"<{n}q", blob, end)]
    elif mode == _V_SEQ and version is not None:
        kept = range(version - n + 1, version + 1)
    else:
        kept = [None] * n
    if row is _ROW_WIDE:
        return [(h, c, t, v) for (h, c, t), v in zip(rows, kept, strict=True)]
    return [(h, c, base + ms / 1000, v) for (h, c, ms), v in zip(rows, kept, strict=True)]


def _pack(items: Sequence[_Item], version: int | None) -> bytes:
    """An ids blob of these entries (oldest first) for an entity at `version`, in the smallest layout."""
    if not items:
        return b""
    n = len(items)
    versions = [item[3] for item in items]
    if all(v is None for v in versions):
        flags = _V_NONE
    elif version is not None and versions == list(range(version - n + 1, version + 1)):
        flags = _V_SEQ
    else:
        flags = _V_EXPLICIT
    seen = [item[2] for item in items]
    base = math.floor(min(seen)) if all(math.isfinite(t) for t in seen) else -1
    ms = [round((t - base) * 1000) for t in seen] if 0 <= base <= _MS_MAX else []
    if ms and max(ms) <= _MS_MAX:
        rows = [_ROW.pack(item[0], item[1], m) for item, m in zip(items, ms, strict=True)]
    else:
        flags |= _WIDE_TIME
        base = 0
        rows = [_ROW_WIDE.pack(*item[:3]) for item in items]
    return b"".join((
        _pack_head(flags, base), *rows,
        struct.pack(f"<{n}q", *(_NO_VERSION if v is None else v for v in versions)) if flags & _V_MASK ==
        _V_EXPLICIT else b"",
    ))


# Not frozen: a frozen dataclass's __init__ costs about 1 µs more, and one or two are built per event.
# Treat it as immutable all the same.
@dataclass(slots=True)
class EntityState:
    """What the guard knows of one entity: its last verified version, clock and content, its last-known-good
    value (with when that value was verified and its event time) and its recent ids (packed columns).

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
        return tuple(SeenId(*item) for item in _items(self.entries, self.version))

    def to_bytes(self) -> bytes:
        """Serialize for the state table (format 3)."""
        version, vclock, event_time = self.version, self.vclock, self.event_time
        flags = ((_HAS_VERSION if version is not None else 0) | (_HAS_EVENT_TIME if event_time is not None else 0)
                 | (_HAS_VCLOCK if vclock is not None else 0))
        kind = self.last_good_type.encode("utf-8", "surrogatepass")
        clock = vclock.to_header() if vclock is not None else b""
        last_good = self.last_good
        size = len(last_good)
        if self.last_good_dropped and not last_good:
            flags |= _DROPPED
            size = self.last_good_dropped
        header = _HEADER
        if len(kind) > _SHORT_MAX or len(clock) > _SHORT_MAX:
            flags |= _LONG_LENGTHS
            header = _HEADER_LONG
        return b"".join((
            header.pack(FORMAT, flags, version if version is not None else 0, self.verified_at,
                        event_time if event_time is not None else 0.0, self.content_hash, len(kind), len(clock),
                        size),
            kind, clock, last_good, self.entries,
        ))

    @classmethod
    def from_bytes(cls, raw: bytes) -> EntityState:
        """Deserialize a state table value, of format 3 or of an earlier one."""
        fmt = raw[0]
        if fmt != FORMAT:
            if fmt == _LEGACY_START:
                return _from_legacy(raw)
            if fmt == 2:
                return _from_format_2(raw)
            raise ValueError(f"entity record of unknown format {fmt}")
        flags = raw[1]
        header = _HEADER_LONG if flags & _LONG_LENGTHS else _HEADER
        _fmt, flags, version, verified_at, event_time, content_hash, kind_len, clock_len, size = \
            header.unpack_from(raw)
        start = header.size
        kind = raw[start:start + kind_len].decode("utf-8", "surrogatepass")
        start += kind_len
        vclock = None
        if flags & _HAS_VCLOCK:
            text = raw[start:start + clock_len]
            vclock = _CLOCKS.get(text)  # _clock's memo, without its call when it holds the clock
            if vclock is None:
                vclock = _clock(text)
        start += clock_len
        dropped = 0
        if flags & _DROPPED:
            dropped, size = size, 0
        # Field by field: the dataclass __init__ call costs more than the stores.
        state = _new(cls)
        state.version = version if flags & _HAS_VERSION else None
        state.vclock = vclock
        state.content_hash = content_hash
        state.last_good = raw[start:start + size]
        state.last_good_type = kind
        state.verified_at = verified_at
        state.event_time = event_time if flags & _HAS_EVENT_TIME else None
        state.entries = raw[start + size:]
        state.last_good_dropped = dropped
        return state

    def last_good_data(self) -> object:
        """The last verified data parsed as JSON, or None when it was not JSON (or was not kept)."""
        try:
            return orjson.loads(self.last_good)
        except orjson.JSONDecodeError:
            return None

    def find(self, event_id: str, now: float, window: float) -> SeenId | None:
        """The recent entry for `event_id` still inside the idempotency window, if any."""
        blob = self.entries
        if not blob:
            return None
        wanted = id_hash(event_id)
        at = blob.find(wanted, _HEAD)
        if at < 0:  # the common case: a new id
            return None
        flags, base = _head(blob)
        n, row = _layout(flags, len(blob))
        size = row.size
        end = _HEAD + size * n
        while 0 <= at < end:
            if (at - _HEAD) % size == 0:
                _, content, seen = row.unpack_from(blob, at)
                seen_at = seen if row is _ROW_WIDE else base + seen / 1000
                if now - seen_at <= window:
                    i = (at - _HEAD) // size
                    mode = flags & _V_MASK
                    version: int | None = None
                    if mode == _V_SEQ and self.version is not None:
                        version = self.version - (n - 1 - i)
                    elif mode == _V_EXPLICIT:
                        found = _version_at(blob, end + 8 * i)[0]
                        version = None if found == _NO_VERSION else found
                    return SeenId(wanted, content, seen_at, version)
            at = blob.find(wanted, at + 1, end)
        return None


# Entity clocks already read, by their bytes: the same text recurs across entities (one writer's counters are
# small numbers). Bounded (`remember`; a merged clock may hold 256 long node ids); only clocks that parsed are kept.
_CLOCKS: dict[bytes, VectorClock] = {}


def _clock(raw: bytes) -> VectorClock:
    """An entity's clock as to_bytes wrote it (VectorClock.to_header of a valid clock): read without the
    checks an event's header needs. The merged clock has its own bound, not the per-event one."""
    vclock = _CLOCKS.get(raw)
    if vclock is None:
        vclock = remember(_CLOCKS, raw, _parse_clock(raw))
    return vclock


def _parse_clock(raw: bytes) -> VectorClock:
    if not raw:
        return VectorClock()
    try:
        return VectorClock._of({node: int(counter) for node, _, counter in
                                (entry.partition("=") for entry in raw.decode().split(","))})
    except ValueError:
        return VectorClock.from_header(raw, max_entries=sys.maxsize)  # names the fault


def new_entries(entries: bytes, event_id: str, content_hash: bytes, seen_at: float, version: int | None,
                now: float, window: float, keep: int, old_version: int | None = None,
                new_version: int | None = None) -> bytes:
    """`entries` (of an entity at `old_version`) with the ones outside the window (and beyond `keep` in all)
    dropped and the new id added, for the entity at `new_version`."""
    wanted = id_hash(event_id)
    prefix = content_hash[:_CONTENT_PREFIX]
    oldest = now - window
    if entries:
        flags, base = _head(entries)
        mode = flags & _V_MASK
        # The common case: the kept rows' bytes reused as they are, one row appended.
        if not flags & _WIDE_TIME and ((mode == _V_SEQ and version is not None and old_version is not None
                                        and version == old_version + 1 and new_version == version)
                                       or (mode == _V_NONE and version is None)):
            n = (len(entries) - _HEAD) // ENTRY_SIZE
            first = n - keep + 1 if n >= keep else 0  # room for the new one (max(0, ...) without its call)
            # Verified in order, so seen_at rises along the entries: the first one inside the window starts the
            # suffix.
            while first < n and base + _ms_at(entries, _HEAD + ENTRY_SIZE * first + _SEEN_AT)[0] / 1000 < oldest:
                first += 1
            ms = round((seen_at - base) * 1000)
            if 0 <= ms <= _MS_MAX:
                return entries[:_HEAD] + entries[_HEAD + ENTRY_SIZE * first:] + _pack_row(wanted, prefix, ms)
    items = _items(entries, old_version)
    first = max(0, len(items) - keep + 1)
    while first < len(items) and items[first][2] < oldest:
        first += 1
    return _pack([*items[first:], (wanted, prefix, seen_at, version)], new_version)


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


def _from_format_2(raw: bytes) -> EntityState:
    """A format 2 record (40-byte entries with 128-bit id hashes), its ids kept in the columns of format 3."""
    (_fmt, flags, version, verified_at, event_time, content_hash, dropped, kind_len, clock_len,
     last_good_len) = _HEADER_2.unpack_from(raw)
    start = _HEADER_2.size
    kind = raw[start:start + kind_len].decode("utf-8", "surrogatepass")
    start += kind_len
    vclock = _clock(raw[start:start + clock_len]) if flags & _HAS_VCLOCK else None
    start += clock_len
    last_good = raw[start:start + last_good_len]
    start += last_good_len
    version_or_none = version if flags & _HAS_VERSION else None
    items = [(h[:ID_BYTES], c[:_CONTENT_PREFIX], t, None if v == _NO_VERSION else v)
             for h, c, t, v in _ENTRY_2.iter_unpack(raw[start:])]
    return EntityState(version_or_none, vclock, content_hash, last_good, kind, verified_at,
                       event_time if flags & _HAS_EVENT_TIME else None, _pack(items, version_or_none), dropped)


def _from_legacy(raw: bytes) -> EntityState:
    """A format 1 record (an orjson list), with its ids hashed as format 3 keeps them."""
    _v, version, vclock, chash, last_good, last_type, verified_at, event_time, recent = orjson.loads(raw)
    # Entries written before versions were kept have three fields.
    items = [(id_hash(e[0]), bytes.fromhex(e[1])[:_CONTENT_PREFIX], e[2], None if len(e) < 4 else e[3])
             for e in recent]
    return EntityState(
        version,
        VectorClock.from_header(vclock, max_entries=sys.maxsize) if vclock is not None else None,
        bytes.fromhex(chash),
        # latin-1 maps every byte to one code point, which is how format 1 kept binary values in JSON.
        last_good.encode("latin-1"),
        last_type,
        verified_at,
        event_time,
        _pack(items, version),
    )


def encode_lamport(value: int) -> bytes:
    """A per-source Lamport high-water mark as table bytes."""
    return str(value).encode()


def decode_lamport(raw: bytes | None) -> int | None:
    """Inverse of encode_lamport; None when the source has no mark yet."""
    return int(raw) if raw else None
