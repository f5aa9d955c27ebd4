"""Write-behind for the guard's tables: state writes wait in memory until the next offset commit.

A write through faust (`table[key] = value`) is a RocksDB put plus a changelog record through faust's producer
buffer, with its future, callbacks, sensors and a second RocksDB put (the persisted offset): about 350 µs of
CPU per write on the bench machine, two per verified event, more than faust spends forwarding the event itself
(bench/results/profile.md). Held here until the commit instead, the writes of one commit interval reach RocksDB
as one WriteBatch per partition, a key written many times in between (a source's Lamport mark) reaches the
changelog once, and the changelog records go straight to the producer: under exactly_once, to the
transactional producer of their partition, so they commit with the input offsets.

What makes it safe: `flush` runs inside every offset commit, under the processing lock (app/eos.py
`before_commit`), and returns only when every changelog record sent since the last commit is delivered, so no
committed offset lacks its state in the changelog; reads see the buffer first, so the next event sees its
predecessor's writes at once. Between commits the agent writes the buffer out whenever FLUSH_KEYS keys are
pending (without waiting for delivery), so a commit stalls processing for a few hundred sends at most. A worker
killed before a commit loses the buffer and the uncommitted offsets together: the events are delivered again
and their writes redone (under exactly_once the changelog records sent so far belong to the aborted
transaction, and the local tables are discarded at the next start, app/eos.py fix 4).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import faust
import rocksdict
from faust.streams import _current_event
from faust.types import TP

#: Per table, per partition, per key: the value to write (None deletes).
Dirty = dict[Any, dict[int, dict[bytes, bytes | None]]]


#: Pending keys at which the agent writes them out before the commit does (a commit's flush then stalls
#: processing for the delivery of the last few only, not for a whole interval's worth of sends).
FLUSH_KEYS = 256

#: How long a commit waits for its changelog records before it gives up and the worker crashes.
DELIVERY_TIMEOUT = 60.0


class StateBuffer:
    """The pending writes of every buffered table; `partition` is the partition of the event being processed."""

    def __init__(self, flush_keys: int = FLUSH_KEYS) -> None:
        self._dirty: Dirty = {}
        self._keys = 0
        self.flush_keys = flush_keys
        #: Changelog records sent but not yet known delivered: (table, changelog partition, future).
        self._sent: list[tuple[Any, TP, Any]] = []
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
        """True when the agent should write the pending keys out (`flush(app, wait=False)`)."""
        return self._keys >= self.flush_keys

    async def flush(self, app: faust.App, *, wait: bool = True) -> None:
        """Write every pending key to its store and send it to its changelog; with `wait`, return once every
        changelog record sent so far is delivered (what a commit needs before its offsets go)."""
        if self._dirty:
            dirty, self._dirty, self._keys = self._dirty, {}, 0
            # Into the stores before the first await: from here on reads no longer see these in the buffer.
            for table, parts in dirty.items():
                _write(table, parts)
            producer = await app.maybe_start_producer()  # under exactly_once: the transaction manager
            # Sent as from outside any event, also when the agent flushes in the middle of one: the transaction
            # manager (app/eos.py) then puts each record in the transaction of its own partition, not in that
            # of the event being processed (a crash between two partitions' commits would otherwise leave one
            # partition's state committed with another's offsets).
            outside_events = _current_event.set(None)
            try:
                for table, parts in dirty.items():
                    topic = table.changelog_topic.get_topic_name()
                    for partition, entries in parts.items():
                        tp = TP(topic, partition)
                        for key, value in entries.items():
                            fut = await producer.send(topic, key, value, partition, None, None)
                            self._sent.append((table, tp, fut))
            finally:
                _current_event.reset(outside_events)
        if wait and self._sent:
            async with asyncio.timeout(DELIVERY_TIMEOUT):  # a delivery that never ends crashes the worker, loudly
                await self._delivered()

    async def _delivered(self) -> None:
        sent, self._sent = self._sent, []
        last: dict[tuple[Any, TP], int] = {}
        for table, tp, fut in sent:
            if not fut.done():
                # Records are delivered a batch at a time: one wait covers the rest of its batch (where a gather
                # would schedule a callback per record).
                await fut
            offset = int(fut.result().offset)  # raises if the record could not be delivered
            if last.get((table, tp), -1) < offset:
                last[(table, tp)] = offset
        for (table, tp), offset in last.items():
            # Where recovery of this changelog partition resumes after a clean restart (as faust does per write).
            table.data.set_persisted_offset(tp, offset)


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
