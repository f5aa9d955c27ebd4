"""Write-behind for the guard's tables: state writes wait in memory until the next offset commit.

A write through faust (`table[key] = value`) is a RocksDB put plus a changelog record through faust's producer
buffer, with its future, callbacks, sensors and a second RocksDB put (the persisted offset): about 350 µs of
CPU per write on the bench machine, two per verified event, more than faust spends forwarding the event itself
(bench/results/profile.md). Held here until the commit instead, the writes of one commit interval reach RocksDB
as one WriteBatch per partition, a key written many times in between (a source's Lamport mark) reaches the
changelog once, and the changelog records go out through the outbox (app/outbox.py) in aiokafka record
batches: under exactly_once, in the transaction of their partition, so they commit with the input offsets.

The order of a commit (`flush`, run inside every offset commit under the processing lock, app/eos.py
`before_commit`), as quix-streams does it: the events' outputs are delivered, then the changelog records are
sent and delivered (the outbox waits for every one, and a failed send fails that commit and every later one),
then the state is written into the local store, and only then do the offsets go. So neither the changelog nor
the local store ever holds state whose event's outputs were not delivered: after a crash (SIGKILL, a send that
failed, a broker outage that ended the worker) a redelivered event is never judged a duplicate of itself with
its output missing. at_least_once may repeat an output; it never loses one. Under exactly_once the outputs and
changelog records are one transaction with the offsets, so changelog records are queued as soon as they are
written out; the state goes into the local store only after the commit's transactions committed (`committed`,
an app/eos.py after-commit hook), and the local tables of a crashed worker are discarded at its next start
(app/eos.py fix 4).

Between commits the agent writes pending keys out whenever FLUSH_KEYS are pending (`write_out`: staged, and
under exactly_once queued in the outbox, which sends them soon, so a commit stalls processing for the delivery
of the last few batches only). Reads see pending writes first, then staged ones, then the store: the next
event sees its predecessor's writes at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import rocksdict
from faust.types import TP, TableT

from byzguard.routing import record_size

if TYPE_CHECKING:
    from app.outbox import Outbox

#: Per table, per partition, per key: the value to write (None deletes).
Dirty = dict[Any, dict[int, dict[bytes, bytes | None]]]


#: Pending keys at which the agent writes them out before the commit does (a commit's flush then stalls
#: processing for the delivery of the last few only, not for a whole interval's worth of sends).
FLUSH_KEYS = 256

#: A changelog record at least this long is measured against its topic's message size limit before it is queued.
MEASURE_FROM = 64 * 1024


class StateTooLargeError(RuntimeError):
    """A state record does not fit its changelog topic: it cannot be made durable, so the worker must stop
    (loudly, before anything of the event that wrote it is committed) rather than lose it."""


class StateBuffer:
    """The pending writes of every buffered table; `partition` is the partition of the event being processed.

    Changelog records go out through `outbox` (app/outbox.py), batched with the agents' own records."""

    def __init__(self, outbox: Outbox | None = None, flush_keys: int = FLUSH_KEYS) -> None:
        self._dirty: Dirty = {}
        #: Written out (queued for the changelog) but not yet in the store: delivered first, then stored.
        self._staged: Dirty = {}
        #: Under exactly_once: the last delivered offset per changelog partition, stored once committed.
        self._delivered: dict[tuple[str, int], int] = {}
        self._keys = 0
        self.flush_keys = flush_keys
        self.outbox = outbox
        #: Changelog topic name -> its table, for every table written out so far.
        self._changelogs: dict[str, Any] = {}
        self.partition = 0

    def reader(self, table: TableT[bytes, bytes]) -> TableReader:
        """A `get(key)` view of `table` at the current event's partition, through the pending writes."""
        return TableReader(self, table)

    def get(self, table: TableT[bytes, bytes], partition: int, key: bytes) -> bytes | None:
        """The value of `key` in `table`'s `partition`: pending write first, else the store."""
        parts = self._dirty.get(table)
        if parts is not None:
            entries = parts.get(partition)
            if entries is not None and key in entries:
                return entries[key]
        if self._staged:
            parts = self._staged.get(table)
            if parts is not None:
                entries = parts.get(partition)
                if entries is not None and key in entries:
                    return entries[key]
        return _read(table, partition, key)

    def put(self, table: TableT[bytes, bytes], partition: int, key: bytes, value: bytes | None) -> None:
        """Write (or, with None, delete) `key` in `table`'s `partition` at the next flush."""
        parts = self._dirty.get(table)
        if parts is None:
            parts = self._dirty[table] = {}
        entries = parts.get(partition)
        if entries is None:
            entries = parts[partition] = {}
        if key not in entries:
            self._keys += 1
        entries[key] = value

    @property
    def pending(self) -> int:
        """How many keys wait for the next flush."""
        return self._keys

    @property
    def full(self) -> bool:
        """True when the agent should write the pending keys out (`write_out()`)."""
        return self._keys >= self.flush_keys

    def write_out(self) -> None:
        """Move every pending key to the staged writes, which reach the store at the next `flush` once delivered.
        Under exactly_once its changelog record is queued in the outbox at once (it commits or aborts with the
        partition's transaction); under at_least_once only at the flush, once the outputs of the events that
        wrote it are delivered. Raises StateTooLargeError for a record its changelog topic cannot take."""
        if not self._dirty:
            return
        outbox = self.outbox
        if outbox is None:
            raise RuntimeError("StateBuffer.write_out needs an outbox to send the changelog records")
        dirty = self._dirty
        for table, parts in dirty.items():
            topic = table.changelog_topic.get_topic_name()
            for partition, entries in parts.items():
                for key, value in entries.items():
                    if value is not None and len(value) >= MEASURE_FROM:
                        size = record_size(key, value, ())
                        limit = outbox.limit(topic)
                        if size > limit:
                            raise StateTooLargeError(
                                f"the state record of key {key[:64]!r} in {topic}[{partition}] takes {size} bytes, "
                                f"more than the topic's limit of {limit} (max.message.bytes): it cannot be made "
                                f"durable; nothing of its event is committed")
        self._dirty, self._keys = {}, 0
        if getattr(outbox, "transactional", False):
            self._queue(dirty)
        staged = self._staged
        for table, parts in dirty.items():
            into = staged.get(table)
            if into is None:
                into = staged[table] = {}
            for partition, entries in parts.items():
                known = into.get(partition)
                if known is None:
                    into[partition] = entries
                else:
                    known.update(entries)

    def _queue(self, writes: Dirty) -> None:
        outbox = self.outbox
        assert outbox is not None
        for table, parts in writes.items():
            topic = table.changelog_topic.get_topic_name()
            self._changelogs[topic] = table
            for partition, entries in parts.items():
                for key, value in entries.items():
                    # Changelogs are co-partitioned with the inputs: the record goes to the transaction of its
                    # own partition under exactly_once (never that of the event being processed).
                    outbox.add(topic, partition, key, value)

    async def flush(self) -> None:
        """What a commit needs before its offsets go: the outputs delivered, then the changelog records
        delivered (see the module doc). Under at_least_once the staged keys then go into the stores; under
        exactly_once only once the transactions committed (`committed`). If a record is not delivered this
        raises, and nothing staged reaches the changelog (at_least_once) or the store."""
        self.write_out()
        outbox = self.outbox
        if outbox is None:
            return
        last = await outbox.flush()
        if getattr(outbox, "transactional", False):
            self._delivered.update(last)
            return
        if self._staged:
            self._queue(self._staged)  # the outputs of every event that wrote these are delivered now
            last.update(await outbox.flush())
        self._store(last)

    async def committed(self, ok: bool) -> None:
        """After an offset commit under exactly_once: its transactions committed (`ok`), so what they wrote goes
        into the stores. A store never holds state of a transaction that may still abort (it would judge the
        aborted events, delivered again, duplicates of themselves)."""
        if ok and self.outbox is not None and getattr(self.outbox, "transactional", False):
            last, self._delivered = self._delivered, {}
            self._store(last)

    def _store(self, last: dict[tuple[str, int], int]) -> None:
        staged, self._staged = self._staged, {}
        for table, parts in staged.items():
            _write(table, parts)
        for (topic, partition), offset in last.items():
            table = self._changelogs.get(topic)
            if table is not None:
                # Where recovery of this changelog partition resumes after a clean restart (as faust does per write).
                table.data.set_persisted_offset(TP(topic, partition), offset)


class TableReader:
    """`get(key)` of one table at the buffer's current partition (what byzguard.guard reads state through)."""

    __slots__ = ("buffer", "table")

    def __init__(self, buffer: StateBuffer, table: TableT[bytes, bytes]) -> None:
        self.buffer = buffer
        self.table = table

    def get(self, key: bytes) -> bytes | None:
        """The value of `key` in the current partition, pending writes included."""
        return self.buffer.get(self.table, self.buffer.partition, key)


def _read(table: Any, partition: int, key: bytes) -> bytes | None:
    store = table.data
    db_for = getattr(store, "_db_for_partition", None)
    if db_for is None:  # the memory store: one dict for every partition
        value: bytes | None = store.data.get(key)
        return value
    found: bytes | None = db_for(partition).get(key)
    return found


def _write(table: Any, parts: Mapping[int, Mapping[bytes, bytes | None]]) -> None:
    store = table.data
    db_for = getattr(store, "_db_for_partition", None)
    if db_for is None:
        for entries in parts.values():
            for key, value in entries.items():
                if value is None:
                    store.data.pop(key, None)
                else:
                    store.data[key] = value
        return
    for partition, entries in parts.items():
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in entries.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        db_for(partition).write(batch)
