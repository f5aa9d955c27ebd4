"""tables.buffer.StateBuffer without a broker: reads see pending writes first, then the real RocksDB store of a
faust table; writing out coalesces keys and puts them in the partition's database. (Sending to the changelog is
Kafka's part: the worker tests restore state from the changelogs on a wiped data dir, on the real broker.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.types import TP

from tables.buffer import StateBuffer, StateTooLargeError, _write


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


class _RecordingOutbox:
    """Records what the buffer queues (the outbox itself is tested on the real broker:
    tests/integration/test_outbox.py); `flush` answers as if record i got offset i."""

    def __init__(self, *, transactional: bool = True) -> None:
        self.records: list[tuple[str, int, bytes | None, bytes | None, object]] = []
        self.flushes = 0
        self.transactional = transactional
        self.at_flush: list[list[str]] = []  # per flush: the topics of the records queued so far

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None, headers: object = None, *,
            source: object = None) -> None:
        self.records.append((topic, partition, key, value, source))

    async def flush(self) -> dict[tuple[str, int], int]:
        self.flushes += 1
        self.at_flush.append([topic for topic, *_ in self.records])
        return {(topic, partition): i for i, (topic, partition, *_) in enumerate(self.records)}


def test_write_out_queues_each_key_once_for_its_own_partitions_changelog_and_keeps_it_from_the_store(
        table: Any) -> None:
    """Written out under exactly_once, a key is queued for its changelog at once and read from the buffer, but it is
    not yet in the store."""
    outbox = _RecordingOutbox()
    buffer = StateBuffer(outbox)  # type: ignore[arg-type]
    buffer.put(table, 2, b"source-a", b"1")
    buffer.put(table, 2, b"source-a", b"2")
    buffer.put(table, 2, b"acct-1", None)
    buffer.put(table, 3, b"acct-7", b"v")
    buffer.write_out()
    changelog = table.changelog_topic.get_topic_name()
    assert outbox.records == [(changelog, 2, b"source-a", b"2", None), (changelog, 2, b"acct-1", None, None),
                              (changelog, 3, b"acct-7", b"v", None)], \
        "no source: under exactly_once a changelog record joins its own partition's transaction, not the event's"
    assert _db(table, 2).get(b"source-a") is None and _db(table, 3).get(b"acct-7") is None, \
        "the store gets a key only once its changelog record (and its event's outputs) are delivered"
    assert buffer.pending == 0 and buffer.get(table, 2, b"source-a") == b"2"
    assert buffer.get(table, 2, b"acct-1") is None and buffer.get(table, 3, b"acct-7") == b"v"
    assert table.data.persisted_offset(TP(changelog, 2)) is None, "nothing is known delivered before a flush"


def test_under_at_least_once_changelog_records_are_sent_only_once_the_outputs_are_delivered(table: Any) -> None:
    """Under at_least_once a written-out key is not queued; the flush delivers the outputs first, then the
    changelog records, then writes the store."""
    outbox = _RecordingOutbox(transactional=False)
    buffer = StateBuffer(outbox)  # type: ignore[arg-type]
    buffer.put(table, 2, b"acct-1", b"v")
    buffer.write_out()
    outbox.add("verified-topic", 2, b"acct-1", b"event")
    assert [topic for topic, *_ in outbox.records] == ["verified-topic"]
    asyncio.run(buffer.flush())
    changelog = table.changelog_topic.get_topic_name()
    assert outbox.at_flush == [["verified-topic"], ["verified-topic", changelog]]
    assert _db(table, 2).get(b"acct-1") == b"v"
    assert table.data.persisted_offset(TP(changelog, 2)) == 1


def test_under_exactly_once_the_store_gets_state_only_once_the_transaction_committed(table: Any) -> None:
    """Under exactly_once a flush delivers; the store and each changelog partition's resume offset are written
    only after a commit that succeeded, never after one that did not."""
    outbox = _RecordingOutbox()
    buffer = StateBuffer(outbox)  # type: ignore[arg-type]
    buffer.put(table, 2, b"source-a", b"1")
    buffer.put(table, 2, b"acct-1", b"v")
    buffer.put(table, 0, b"acct-2", b"w")
    outbox.add("verified-topic", 2, b"acct-1", b"event")  # the agents' own records share the outbox
    asyncio.run(buffer.flush())
    changelog = table.changelog_topic.get_topic_name()
    assert outbox.flushes == 1 and buffer.pending == 0
    assert _db(table, 2).get(b"acct-1") is None and table.data.persisted_offset(TP(changelog, 2)) is None
    asyncio.run(buffer.committed(False))
    assert _db(table, 2).get(b"acct-1") is None, "a commit that did not happen writes nothing"
    assert buffer.get(table, 2, b"acct-1") == b"v"
    asyncio.run(buffer.committed(True))
    assert table.data.persisted_offset(TP(changelog, 2)) == 2
    assert table.data.persisted_offset(TP(changelog, 0)) == 3
    assert _db(table, 2).get(b"acct-1") == b"v" and _db(table, 0).get(b"acct-2") == b"w"


class _FailingOutbox(_RecordingOutbox):
    async def flush(self) -> dict[tuple[str, int], int]:
        raise ConnectionError("batch not delivered")


def test_a_flush_whose_records_are_not_delivered_writes_nothing_to_the_store(table: Any) -> None:
    """State whose outputs were not delivered never reaches the store (a redelivered event is not its own duplicate)."""
    buffer = StateBuffer(_FailingOutbox())  # type: ignore[arg-type]
    buffer.put(table, 1, b"acct-1", b"v")
    buffer.write_out()  # as the agent does mid-interval
    buffer.put(table, 1, b"acct-2", b"w")
    with pytest.raises(ConnectionError):
        asyncio.run(buffer.flush())
    assert _db(table, 1).get(b"acct-1") is None and _db(table, 1).get(b"acct-2") is None
    assert buffer.get(table, 1, b"acct-1") == b"v", "still read from the buffer while the worker stops"


class _SmallOutbox(_RecordingOutbox):
    def limit(self, topic: str) -> int:
        return 100_000


def test_a_state_record_larger_than_its_changelog_takes_stops_the_write_out(table: Any) -> None:
    """A state record its changelog topic cannot take is refused loudly before anything of it is queued."""
    outbox = _SmallOutbox()
    buffer = StateBuffer(outbox)  # type: ignore[arg-type]
    buffer.put(table, 0, b"acct-1", b"v" * 200_000)
    with pytest.raises(StateTooLargeError, match="200"):
        buffer.write_out()
    assert outbox.records == [] and buffer.pending == 1


def test_writing_out_without_an_outbox_is_refused(table: Any) -> None:
    buffer = StateBuffer()
    buffer.put(table, 0, b"acct-1", b"v")
    with pytest.raises(RuntimeError, match="outbox"):
        buffer.write_out()
