"""tables.buffer.StateBuffer without a broker: reads see pending writes first, then the real RocksDB store of a
faust table; writing out coalesces keys and puts them in the partition's database. (Sending to the changelog is
Kafka's part: the worker tests restore state from the changelogs on a wiped data dir, on the real broker.)"""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.streams import _current_event, current_event
from faust.types import TP

from tables.buffer import StateBuffer, _write


@pytest.fixture
def table(tmp_path: Path) -> Any:
    app = faust.App("buffer-test", store="rocksdb://", datadir=str(tmp_path), autodiscover=False, env={})
    return app.Table("t", key_type=bytes, value_type=bytes, partitions=4)


def _db(table: Any, partition: int) -> Any:
    return table.data._db_for_partition(partition)


def test_a_read_falls_through_to_the_store_of_the_current_partition(table: Any) -> None:
    _db(table, 1).put(b"acct-1", b"in partition 1")
    buffer = StateBuffer()
    reader = buffer.reader(table)
    buffer.partition = 1
    assert reader.get(b"acct-1") == b"in partition 1"
    buffer.partition = 2
    assert reader.get(b"acct-1") is None


def test_a_pending_write_is_read_before_the_store_and_only_in_its_partition(table: Any) -> None:
    _db(table, 1).put(b"acct-1", b"old")
    buffer = StateBuffer()
    reader = buffer.reader(table)
    buffer.put(table, 1, b"acct-1", b"new")
    buffer.partition = 1
    assert reader.get(b"acct-1") == b"new"
    assert buffer.get(table, 3, b"acct-1") is None
    assert _db(table, 1).get(b"acct-1") == b"old", "nothing reaches the store before a flush"


def test_a_pending_delete_hides_the_stored_value(table: Any) -> None:
    _db(table, 0).put(b"acct-1", b"old")
    buffer = StateBuffer()
    buffer.put(table, 0, b"acct-1", None)
    assert buffer.get(table, 0, b"acct-1") is None


def test_pending_counts_distinct_keys_and_full_at_the_threshold(table: Any) -> None:
    buffer = StateBuffer(flush_keys=3)
    buffer.put(table, 0, b"source-a", b"1")
    buffer.put(table, 0, b"source-a", b"2")  # a hot key written again: still one pending write
    buffer.put(table, 1, b"source-a", b"1")
    assert (buffer.pending, buffer.full) == (2, False)
    buffer.put(table, 1, b"acct-9", b"v")
    assert (buffer.pending, buffer.full) == (3, True)


def test_writing_out_puts_the_last_value_of_each_key_in_its_partitions_database(table: Any) -> None:
    _db(table, 2).put(b"gone", b"x")
    _write(table, {2: {b"acct-1": b"v2", b"gone": None}, 3: {b"acct-1": b"other"}})
    assert _db(table, 2).get(b"acct-1") == b"v2"
    assert _db(table, 2).get(b"gone") is None
    assert _db(table, 3).get(b"acct-1") == b"other"


def test_the_memory_store_is_read_and_written_too(tmp_path: Path) -> None:
    app = faust.App("buffer-test-memory", store="memory://", datadir=str(tmp_path), autodiscover=False, env={})
    table: Any = app.Table("t", key_type=bytes, value_type=bytes, partitions=2)
    buffer = StateBuffer()
    buffer.put(table, 0, b"acct-1", b"v1")
    assert buffer.get(table, 0, b"acct-1") == b"v1"
    _write(table, {0: {b"acct-1": b"v1"}})
    assert StateBuffer().get(table, 0, b"acct-1") == b"v1"


class _Event:
    """Stands for the stream event the agent is processing when it flushes early."""


class _RecordingProducer:
    """Takes each send at once and records which event was current then (the transaction it would land in)."""

    def __init__(self) -> None:
        self.sends: list[tuple[str, bytes, bytes | None, int, object]] = []

    async def send(self, topic: str, key: bytes, value: bytes | None, partition: int, timestamp: None,
                   headers: None) -> asyncio.Future[Any]:
        self.sends.append((topic, key, value, partition, current_event()))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(SimpleNamespace(offset=len(self.sends) - 1))
        return done


def test_flush_writes_each_key_once_as_from_outside_any_event_and_records_the_changelog_offset(table: Any) -> None:
    producer = _RecordingProducer()
    app = SimpleNamespace(maybe_start_producer=lambda: _ready(producer))
    buffer = StateBuffer()
    buffer.put(table, 2, b"source-a", b"1")
    buffer.put(table, 2, b"source-a", b"2")
    buffer.put(table, 2, b"acct-1", None)
    event = _Event()

    async def flush_inside_an_event() -> None:
        token = _current_event.set(weakref.ref(event))  # type: ignore[arg-type]
        try:
            await buffer.flush(app, wait=False)  # type: ignore[arg-type]
            assert current_event() is event, "the agent's event is current again after the flush"
        finally:
            _current_event.reset(token)
        await buffer.flush(app)  # type: ignore[arg-type]  # the commit's flush: waits for delivery

    asyncio.run(flush_inside_an_event())
    changelog = table.changelog_topic.get_topic_name()
    assert [s[:4] for s in producer.sends] == [(changelog, b"source-a", b"2", 2), (changelog, b"acct-1", None, 2)]
    assert all(s[4] is None for s in producer.sends), "a record sent inside an event would join its transaction"
    assert _db(table, 2).get(b"source-a") == b"2"
    assert table.data.persisted_offset(TP(changelog, 2)) == 1
    assert buffer.pending == 0


async def _ready(producer: _RecordingProducer) -> _RecordingProducer:
    return producer
