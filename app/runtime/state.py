"""One route partition's state for the batched runtime, in faust's RocksDB layout, and its restore.

The databases are the ones faust's rocksdb tables use (`<tabledir>/<route>-<table>-<partition>.db`, raw keys and
values, faust's RocksDB options through its own `RocksDBOptions`), and each holds, as faust writes it, the offset
of the last changelog record it contains under `__faust\\0offset__`. So a data dir written by the faust agent
runtime of earlier releases is read as it is. The batched runtime adds one key to the state_by_entity database: the
next input offset of each input partition whose events the stored state includes (at_least_once resumes from
the larger of it and the committed offset), and the wall-clock time (ms) of the last store or restore under which
every table of the partition held its changelog to its end.

Compaction removes a tombstone once it is `delete.retention.ms` old (24 h by default): a database that last stored
longer ago than that may never see a delete written after its offset (a released causal-buffer entry, a closed
audit join key), and its stale value would come back. So a database is brought forward from its offset only when
its last store is recent enough (`stale_reason`); otherwise it is wiped and restored from the changelog's beginning.

Reads go through the writes of the batch in progress, then those of the batch in flight (sealed: the runtime
delivers it while it processes the next one), then RocksDB. A batch's writes go to RocksDB in one
WriteBatch per table, with the changelog offset (and, for state_by_entity, the input offsets) in the same
WriteBatch; state_by_entity is written last, so its input offsets never run ahead of the other tables.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, cast

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from faust.stores.rocksdb import RocksDBOptions
from rocksdict import Rdict, WriteBatch

from app.runtime.limits import topic_settings
from byzguard.config import Route
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS
from tables import TABLE_OF, table_name

log = logging.getLogger(__name__)

#: faust's key of the last changelog offset a database holds (faust/stores/rocksdb.py `Store.offset_key`).
OFFSET_KEY = b"__faust\0offset__"
#: The batched runtime's key (state_by_entity only) of the next input offset per input topic, as JSON.
INPUTS_KEY = b"__byzguard\0input_offsets__"
#: The batched runtime's key (state_by_entity only, `inputs_table`) of the wall-clock time in ms of the last store or
#: restore, at which every table of the partition held its changelog to its end.
STORED_AT_KEY = b"__byzguard\0stored_at_ms__"
#: Kafka's default `delete.retention.ms` (the broker's `log.cleaner.delete.retention.ms`): assumed for a changelog
#: whose own cannot be read.
DEFAULT_DELETE_RETENTION_MS = 86_400_000
#: A local database is brought forward from its offset only when it last stored at most this fraction of its
#: changelog's delete.retention.ms ago: the rest covers the restore's own reading time, a batch whose changelog was
#: on its way when it stored, and a wall clock that was stepped forward.
REUSE_FRACTION = 0.5
#: How far the wall clock may have gone back since the last store (NTP slewing) before the time is not trusted.
CLOCK_SLACK_MS = 60_000
#: Changelog records replayed per RocksDB WriteBatch during a restore.
RESTORE_CHUNK = 10_000

Writes = dict[str, dict[bytes, bytes | None]]
#: What a key the batch has not written reads as in its pending writes (None there is a deletion).
_UNWRITTEN: Final = cast(bytes, object())


def state_names(route: Route) -> list[str]:
    """The guard's state names a route keeps (the causal buffer only where the route holds early events)."""
    return [ENTITIES, LAMPORTS, *([CAUSAL] if route.causal.buffer else [])]


def changelog_topic(app_id: str, route: Route, name: str) -> str:
    """The changelog topic of one state name of `route` (faust's `<app_id>-<table>-changelog`)."""
    return f"{app_id}-{table_name(route, TABLE_OF[name])}-changelog"


def db_path(tabledir: Path, route: Route, name: str, partition: int) -> Path:
    """Where faust's rocksdb store keeps a table partition (faust `Store.partition_path`)."""
    return tabledir / f"{table_name(route, TABLE_OF[name])}-{partition}.db"



def write_batch_of(writes: Mapping[bytes, bytes | None]) -> WriteBatch:
    """One RocksDB write batch of a batch's pending writes (None: delete the key)."""
    batch = WriteBatch(raw_mode=True)
    for key, value in writes.items():
        if value is None:
            batch.delete(key)
        else:
            batch.put(key, value)
    return batch

class _Reader:
    """One table of one partition as the processor seam sees it (byzguard.processor `TableState`): the pending
    writes of the batch in progress first, then those of the batch in flight (sealed, being delivered), then
    RocksDB; writes wait in the batch until it is stored."""

    __slots__ = ("db", "flight", "pending")

    def __init__(self, pending: dict[bytes, bytes | None], flight: dict[bytes, bytes | None], db: Rdict) -> None:
        self.pending = pending
        self.flight = flight
        self.db = db

    def get(self, key: bytes) -> bytes | None:
        value = self.pending.get(key, _UNWRITTEN)  # one lookup: most keys are read before the batch writes them
        if value is _UNWRITTEN:
            value = self.flight.get(key, _UNWRITTEN)
            if value is _UNWRITTEN:
                found: bytes | None = self.db.get(key)
                return found
        return value

    def put(self, key: bytes, value: bytes) -> None:
        self.pending[key] = value

    def delete(self, key: bytes) -> None:
        self.pending[key] = None

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every key of the table with its value, the writes of the batches in flight and in progress included
        (a snapshot)."""
        pending, flight = self.pending, self.flight
        found: list[tuple[bytes, bytes]] = []
        it = self.db.iter()
        it.seek_to_first()
        while it.valid():
            key = it.key()
            if key not in pending and key not in flight and key not in (OFFSET_KEY, INPUTS_KEY, STORED_AT_KEY):
                found.append((key, it.value()))
            it.next()
        found.extend((key, value) for key, value in flight.items() if value is not None and key not in pending)
        found.extend((key, value) for key, value in pending.items() if value is not None)
        return found


class PartitionState:
    """The open databases of one route partition, the writes of its batch in progress (`pending`) and those of
    the batch in flight before it (`flight`: sealed, its outputs and changelog records on their way).

    `tables` (state name -> faust table name) opens other tables of faust's layout instead of the route's (an
    audit rule's join table, app/runtime/audits.py); the first name then holds the input offsets."""

    def __init__(self, tabledir: Path, route: Route | None, partition: int, options: Mapping[str, Any], *,
                 tables: Mapping[str, str] | None = None) -> None:
        self.route = route
        self.partition = partition
        if tables is None:
            assert route is not None
            self.names = state_names(route)
            self.paths = {name: db_path(tabledir, route, name, partition) for name in self.names}
        else:
            self.names = list(tables)
            self.paths = {name: tabledir / f"{table}-{partition}.db" for name, table in tables.items()}
        #: The table whose WriteBatch also holds the input offsets (written last).
        self.inputs_table = ENTITIES if ENTITIES in self.names else self.names[0]
        self._options = RocksDBOptions(**dict(options))
        self.dbs: dict[str, Rdict] = {}
        self.pending: Writes = {name: {} for name in self.names}
        self.flight: Writes = {name: {} for name in self.names}
        self.readers: dict[str, Any] = {}
        self._open()

    def _open(self) -> None:
        for name, path in self.paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.dbs[name] = self._options.open(path)
        self.readers = {name: _Reader(self.pending[name], self.flight[name], self.dbs[name]) for name in self.names}
        if self.route is not None and CAUSAL not in self.readers:
            self.readers[CAUSAL] = {}  # the route holds no early events: the guard never reads or writes it

    def changelog_offset(self, name: str) -> int | None:
        """The offset of the last changelog record the database of `name` holds (None: not known)."""
        raw = self.dbs[name].get(OFFSET_KEY)
        return int(raw) if raw is not None else None

    def input_offsets(self) -> dict[str, int]:
        """Per input topic, the next offset of the events whose state is stored (empty: not known)."""
        raw = self.dbs[self.inputs_table].get(INPUTS_KEY)
        return {str(k): int(v) for k, v in orjson.loads(raw).items()} if raw else {}

    def stored_at(self) -> int | None:
        """The wall-clock time (ms) of the last store or restore (None: not known, a data dir of an earlier
        release or of the faust runtime)."""
        raw = self.dbs[self.inputs_table].get(STORED_AT_KEY)
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None

    def mark_stored_at(self, at_ms: int) -> None:
        """Record that at `at_ms` every table of the partition held its changelog to its end (after a restore)."""
        self.dbs[self.inputs_table][STORED_AT_KEY] = str(at_ms).encode()

    def discard(self) -> None:
        """Forget the batch in flight and the one in progress (built on it): a transaction aborted."""
        for writes in (*self.pending.values(), *self.flight.values()):
            writes.clear()

    def seal(self, *, stacked: bool = False) -> Writes:
        """The batch in progress goes in flight: its writes stay readable, under the next batch's, until
        `store(..., sealed=...)` writes them to RocksDB (or `discard` drops them). Returns the batch's own writes
        (`stacked`; else nothing: `store(..., sealed=True)` stores the one batch in flight).

        One batch in flight at most, unless `stacked` (at_least_once: the next batch goes in flight while the
        changelog of the one before is on its way): the in-flight overlay then holds the newest write of each key
        of the batches in flight, and `store(..., sealed=<their own writes>)` stores them oldest first."""
        own: Writes = {}
        for name, writes in self.pending.items():
            flight = self.flight[name]
            if stacked:
                own[name] = dict(writes)
            else:
                assert not flight, "a batch is already in flight"
            flight.update(writes)
            writes.clear()
        return own

    def store(self, changelog_offsets: Mapping[str, int], inputs: Mapping[str, int], *,
              sealed: bool | Writes = False) -> None:
        """Write the batch in progress (`sealed=True`: the batch in flight; `sealed=<what seal returned>`: that
        batch in flight, the oldest) to RocksDB: one WriteBatch per table with its last changelog offset, the
        state_by_entity one (`inputs_table`) last with the input offsets of the batch."""
        if isinstance(sealed, dict):
            for name, writes in sealed.items():  # what a later batch in flight did not overwrite: in RocksDB now
                flight = self.flight[name]
                for key, value in writes.items():
                    if flight.get(key, _UNWRITTEN) == value:
                        del flight[key]
            self._store(sealed, changelog_offsets, inputs)
            return
        self._store(self.flight if sealed else self.pending, changelog_offsets, inputs)

    def _store(self, tables: Writes, changelog_offsets: Mapping[str, int], inputs: Mapping[str, int]) -> None:
        inputs_table = self.inputs_table
        for name in sorted(self.names, key=lambda n: n == inputs_table):  # state_by_entity last
            writes = tables[name]
            offset = changelog_offsets.get(name)
            if not writes and offset is None and name != inputs_table:
                continue
            batch = write_batch_of(writes)
            if offset is not None:
                batch.put(OFFSET_KEY, str(offset).encode())
            if name == inputs_table:
                if inputs:
                    known = self.input_offsets()
                    known.update(inputs)
                    batch.put(INPUTS_KEY, orjson.dumps(known))
                batch.put(STORED_AT_KEY, str(int(time.time() * 1000)).encode())
            self.dbs[name].write(batch)
            writes.clear()

    def wipe(self, name: str) -> None:
        """Drop the local database of `name` (it is restored from its changelog from the beginning)."""
        self.dbs[name].close()
        shutil.rmtree(self.paths[name], ignore_errors=True)
        self.dbs[name] = self._options.open(self.paths[name])
        self.readers[name] = _Reader(self.pending[name], self.flight[name], self.dbs[name])

    def close(self) -> None:
        for db in self.dbs.values():
            db.close()
        self.dbs = {}


def stale_reason(stored: int | None, stored_at_ms: int | None, begin: int, end: int, *, now_ms: int,
                 retention_ms: int) -> str | None:
    """Why a local database whose last changelog offset is `stored` cannot be brought to the changelog's `end` by
    replaying from `stored + 1` (None: it can). `stored_at_ms`: the partition's last store or restore (wall clock);
    `begin`: the changelog's first offset; `retention_ms`: its delete.retention.ms.

    Compaction keeps a key's newest value but drops a tombstone once it is `retention_ms` old, so a database that
    has not held its changelog's end for longer than that may miss a delete written after its offset; it is
    reused only when its last store is at most `REUSE_FRACTION` of that old, or when nothing was written after its
    offset at all. Fail-safe: a database without the time (a data dir of an earlier release or of the faust
    runtime) or with one in the future (the clock went back) is not reused."""
    if stored is None:
        return "it holds no changelog offset"
    if stored >= end:
        return f"its changelog offset {stored} is at or past the changelog's end {end}"
    if stored + 1 < begin:
        return f"the changelog now begins at {begin}, after its offset {stored} (records were deleted)"
    if stored + 1 == end:
        return None  # nothing was written after it: nothing can have been compacted away
    if stored_at_ms is None:
        return ("it does not record when it last stored (a data dir of an earlier release): compaction may have "
                "removed tombstones written after its offset")
    gap = now_ms - stored_at_ms
    if gap < -CLOCK_SLACK_MS:
        return f"it last stored {-gap / 1000:.0f} s in the future (the clock went back): its age is not known"
    if gap > retention_ms * REUSE_FRACTION:
        return (f"it last stored {gap / 3_600_000:.2f} h ago, more than {REUSE_FRACTION:g} of the changelog's "
                f"delete.retention.ms ({retention_ms} ms): compaction may have removed tombstones written after "
                f"its offset {stored}")
    return None


async def delete_retention(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """Each topic's effective `delete.retention.ms` (its own, else the broker's); `DEFAULT_DELETE_RETENTION_MS`,
    with a warning, for a topic whose value cannot be read."""
    found: dict[str, int] = {}
    if not topics:
        return found
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    try:
        await admin.start()
        found = await topic_settings(admin, topics, "delete.retention.ms")
    except Exception as exc:  # the default is assumed, with a warning, below
        log.warning("restore: cannot read delete.retention.ms of %s (%r)", topics, exc)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    missing = [t for t in topics if t not in found]
    if missing:
        log.warning("restore: delete.retention.ms of %s not known; assuming Kafka's default of %d ms", missing,
                    DEFAULT_DELETE_RETENTION_MS)
    return {t: found.get(t, DEFAULT_DELETE_RETENTION_MS) for t in topics}


async def restore(bootstrap: str, parts: list[tuple[PartitionState, dict[str, str]]]) -> int:
    """Bring each partition's databases to the end of their changelogs (read_committed), from the offset each
    holds; a database that cannot be brought forward from its offset (`stale_reason`: none, one at or past the
    changelog's end, one the changelog no longer reaches back to, or one that last stored too long ago for the
    changelog's tombstones to still be there) is wiped and restored from the beginning. Afterwards each partition
    records the time it was at its changelogs' end.
    `parts`: each PartitionState with its changelog topic per state name. Returns the records replayed."""
    targets: dict[TopicPartition, tuple[PartitionState, str]] = {}
    for part, topics in parts:
        for name in part.names:
            targets[TopicPartition(topics[name], part.partition)] = (part, name)
    if not targets:
        return 0
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                isolation_level="read_committed", auto_offset_reset="earliest")
    await consumer.start()
    replayed = 0
    started = time.monotonic()
    try:
        tps = list(targets)
        consumer.assign(tps)
        stored_of = {tp: part.changelog_offset(name) for tp, (part, name) in targets.items()}
        stored_at = {id(part): part.stored_at() for part, _ in targets.values()}  # before any table is wiped
        retention = await delete_retention(bootstrap, sorted({tp.topic for tp, s in stored_of.items()
                                                              if s is not None}))
        at_end_ms = int(time.time() * 1000)  # before the ends are read: every record past them is newer
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        todo: dict[TopicPartition, int] = {}
        for tp, (part, name) in targets.items():
            stored = stored_of[tp]
            end = ends[tp]
            reason = stale_reason(stored, stored_at[id(part)], begins[tp], end, now_ms=at_end_ms,
                                  retention_ms=retention.get(tp.topic, DEFAULT_DELETE_RETENTION_MS))
            if reason is not None:
                if stored is not None or _has_data(part.dbs[name]):
                    log.warning("restore %s[%d]: local offset %s, changelog %d..%d: the local state is wiped and "
                                "restored from the changelog's beginning: %s", tp.topic, tp.partition, stored,
                                begins[tp], end, reason)
                    part.wipe(name)
                start = begins[tp]
            else:
                assert stored is not None
                start = stored + 1
            if start < end:
                consumer.seek(tp, start)
                todo[tp] = end
        if todo:
            consumer.pause(*[tp for tp in tps if tp not in todo])
        while todo:
            fetched = await consumer.getmany(*todo, timeout_ms=1000, max_records=RESTORE_CHUNK)
            for tp, messages in fetched.items():
                part, name = targets[tp]
                batch = WriteBatch(raw_mode=True)
                for msg in messages:
                    if msg.value is None:
                        batch.delete(msg.key)
                    else:
                        batch.put(msg.key, msg.value)
                if messages:
                    batch.put(OFFSET_KEY, str(messages[-1].offset).encode())
                    part.dbs[name].write(batch)
                    replayed += len(messages)
            for tp in list(todo):
                if await consumer.position(tp) >= todo[tp]:
                    del todo[tp]
                    consumer.pause(tp)
    finally:
        await consumer.stop()
    for part in dict.fromkeys(part for part, _ in targets.values()):
        part.mark_stored_at(at_end_ms)
    if replayed:
        log.info("restored %d changelog records for %d table partitions in %.2f s", replayed, len(targets),
                 time.monotonic() - started)
    return replayed


def _has_data(db: Rdict) -> bool:
    """Whether the database holds any key but the time of the last restore (which an empty partition gets too)."""
    it = db.iter()
    it.seek_to_first()
    while it.valid():
        if it.key() != STORED_AT_KEY:
            return True
        it.next()
    return False
