"""Write-behind for the guard's tables: state writes wait in memory until the next offset commit.

A write through faust (`table[key] = value`) is a RocksDB put plus a changelog record through faust's producer
buffer, with its future, callbacks, sensors and a second RocksDB put (the persisted offset): about 350 µs of
CPU per write on the bench machine, two per verified event, more than faust spends forwarding the event itself
(bench/results/profile.md). Held here until the commit instead, the writes of one commit interval reach RocksDB
as one WriteBatch per partition, a key written many times in between (a source's Lamport mark) reaches the
changelog once, and the changelog records go out through the outbox (app/outbox.py) in aiokafka record
batches: under exactly_once, in the transaction of their partition, so they commit with the input offsets.

What makes it safe: `flush` runs inside every offset commit, under the processing lock (app/eos.py
`before_commit`), and returns only when every changelog record sent since the last commit is delivered, so no
committed offset lacks its state in the changelog; reads see the buffer first, so the next event sees its
predecessor's writes at once. Between commits the agent writes the buffer out whenever FLUSH_KEYS keys are
pending (`write_out`: into the stores and the outbox, which sends them soon), so a commit stalls processing for
the delivery of the last few batches only. A worker
killed before a commit loses the buffer and the uncommitted offsets together: the events are delivered again
and their writes redone (under exactly_once the changelog records sent so far belong to the aborted
transaction, and the local tables are discarded at the next start, app/eos.py fix 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import faust
import rocksdict
from faust.types import TP

if TYPE_CHECKING:
    from app.outbox import Outbox

#: Per table, per partition, per key: the value to write (None deletes).
Dirty = dict[Any, dict[int, dict[bytes, bytes | None]]]


#: Pending keys at which the agent writes them out before the commit does (a commit's flush then stalls
#: processing for the delivery of the last few only, not for a whole interval's worth of sends).
FLUSH_KEYS = 256

class StateBuffer:
    """The pending writes of every buffered table; `partition` is the partition of the event being processed.

    Changelog records go out through `outbox` (app/outbox.py), batched with the agents' own records."""

    def __init__(self, outbox: Outbox | None = None, flush_keys: int = FLUSH_KEYS) -> None:
        self._dirty: Dirty = {}
        self._keys = 0
        self.flush_keys = flush_keys
        self.outbox = outbox
        #: Changelog topic name -> its table, for every table written out so far.
        self._changelogs: dict[str, Any] = {}
        self.partition = 0

    def reader(self, table: faust.TableT[bytes, bytes]) -> TableReader:
        """A `get(key)` view of `table` at the current event's partition, through the pending writes."""
        return TableReader(self, table)

    def get(self, table: faust.TableT[bytes, bytes], partition: int, key: bytes) -> bytes | None:
        """The value of `key` in `table`'s `partition`: pending write first, else the store."""
        parts = self._dirty.get(table)
        if parts is not None:
            entries = parts.get(partition)
            if entries is not None and key in entries:
                return entries[key]
        return _read(table, partition, key)

    def put(self, table: faust.TableT[bytes, bytes], partition: int, key: bytes, value: bytes | None) -> None:
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
        """Write every pending key to its store and queue it for its changelog in the outbox."""
        if not self._dirty:
            return
        dirty, self._dirty, self._keys = self._dirty, {}, 0
        outbox = self.outbox
        if outbox is None:
            raise RuntimeError("StateBuffer.write_out needs an outbox to send the changelog records")
        for table, parts in dirty.items():
            _write(table, parts)  # from here on reads see these in the stores
            topic = table.changelog_topic.get_topic_name()
            self._changelogs[topic] = table
            for partition, entries in parts.items():
                for key, value in entries.items():
                    # Changelogs are co-partitioned with the inputs: the record goes to the transaction of its
                    # own partition under exactly_once (never that of the event being processed).
                    outbox.add(topic, partition, key, value)

    async def flush(self) -> None:
        """Write out every pending key and wait until its changelog record (with everything else in the outbox)
        is delivered: what a commit needs before its offsets go."""
        self.write_out()
        if self.outbox is None:
            return
        last = await self.outbox.flush()
        for (topic, partition), offset in last.items():
            table = self._changelogs.get(topic)
            if table is not None:
                # Where recovery of this changelog partition resumes after a clean restart (as faust does per write).
                table.data.set_persisted_offset(TP(topic, partition), offset)


class TableReader:
    """`get(key)` of one table at the buffer's current partition (what byzguard.guard reads state through)."""

    __slots__ = ("buffer", "table")

    def __init__(self, buffer: StateBuffer, table: faust.TableT[bytes, bytes]) -> None:
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
