"""app/runtime/state.py without a broker: the batched runtime's databases are faust's (same paths, same raw keys,
same changelog offset key), reads see the batch's pending writes first, and one store writes state and offsets
together. (Restore from the changelogs runs on the real broker: tests/integration/test_runtime_batched.py.)"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.runtime.state import (
    CLOCK_SLACK_MS,
    DEFAULT_DELETE_RETENTION_MS,
    OFFSET_KEY,
    PartitionState,
    changelog_topic,
    db_path,
    stale_reason,
)
from byzguard.config import GuardConfig, Route, load
from byzguard.guard import ENTITIES, LAMPORTS


@pytest.fixture
def config(tmp_path: Path) -> GuardConfig:
    path = tmp_path / "byzguard.yaml"
    path.write_text("routes:\n  - {name: r, inputs: [in], verified_topic: out, quarantine_topic: bad,\n"
                    "      types: {t: {}}}\n")
    return load(path)


def _faust_tables(tmp_path: Path, config: GuardConfig) -> Any:
    """The route's tables as the faust agent runtime of earlier releases declared them on its App (faust's rocksdb
    store, raw bytes keys and values), to compare with what the batched runtime opens."""
    import faust

    from tables import store_options, table_names

    options = store_options(write_buffer_mb=8, block_cache_mb=8)
    app = faust.App("byzguard", broker="kafka://127.0.0.1:9092", store="rocksdb://", datadir=str(tmp_path / "data"),
                    autodiscover=False, env={})
    route = config.routes[0]
    state, lamports = (app.Table(name, key_type=bytes, value_type=bytes, partitions=route.partitions,
                                 options=dict(options)) for name in table_names(route))
    return SimpleNamespace(app=app, store_options=options,
                           tables={route.name: SimpleNamespace(state_by_entity=state, lamport_by_source=lamports)})


def test_paths_and_changelog_names_are_those_of_fausts_tables(tmp_path: Path, config: GuardConfig) -> None:
    """Each state name's database is the file faust's rocksdb store of that table uses, and its changelog topic
    is the table's: a data dir and changelogs written by the faust runtime of earlier releases are read as they are."""
    built = _faust_tables(tmp_path, config)
    route = config.routes[0]
    tables = built.tables["r"]
    tabledir = Path(built.app.conf.tabledir)
    for name, table in ((ENTITIES, tables.state_by_entity), (LAMPORTS, tables.lamport_by_source)):
        assert db_path(tabledir, route, name, 3) == table.data.partition_path(3)
        assert changelog_topic(built.app.conf.id, route, name) == table.changelog_topic.get_topic_name()
        assert table.data.offset_key == OFFSET_KEY


def test_state_written_through_faust_is_read_and_its_changelog_offset_known(tmp_path: Path,
                                                                             config: GuardConfig) -> None:
    """A key and persisted changelog offset that faust's store wrote are what the batched runtime reads."""
    built = _faust_tables(tmp_path, config)
    table = built.tables["r"].state_by_entity
    db = table.data._db_for_partition(1)
    db.put(b"acct-1", b"state of acct-1")
    table.data.set_persisted_offset(_tp(table, 1), 41)
    table.data._dbs.pop(1).close()
    part = PartitionState(Path(built.app.conf.tabledir), config.routes[0], 1, built.store_options)
    try:
        assert part.readers[ENTITIES].get(b"acct-1") == b"state of acct-1"
        assert part.changelog_offset(ENTITIES) == 41
        assert part.changelog_offset(LAMPORTS) is None
    finally:
        part.close()


def _tp(table: Any, partition: int) -> Any:
    from faust.types import TP

    return TP(table.changelog_topic.get_topic_name(), partition)


def _route(config: GuardConfig) -> Route:
    return config.routes[0]


def test_pending_writes_are_read_first_and_stored_with_their_offsets_in_one_go(tmp_path: Path,
                                                                              config: GuardConfig) -> None:
    """A batch's writes (and deletes) are visible to the next record before they are stored; `store` writes them
    with the last changelog offset of each table and the next input offset, and a reopened partition reads them."""
    route = _route(config)
    part = PartitionState(tmp_path, route, 0, {})
    part.dbs[ENTITIES].put(b"gone", b"old")
    part.readers[ENTITIES].put(b"a", b"1")
    part.readers[LAMPORTS].put(b"src", b"7")
    part.readers[ENTITIES].delete(b"gone")
    assert part.readers[ENTITIES].get(b"a") == b"1" and part.readers[ENTITIES].get(b"gone") is None
    assert sorted(part.readers[ENTITIES].items()) == [(b"a", b"1")], "items: the batch's view, no offset keys"
    assert part.dbs[ENTITIES].get(b"a") is None, "nothing reaches RocksDB before the store"
    part.store({ENTITIES: 12, LAMPORTS: 5}, {"in": 100})
    part.close()

    again = PartitionState(tmp_path, route, 0, {})
    try:
        assert again.readers[ENTITIES].get(b"a") == b"1" and again.readers[ENTITIES].get(b"gone") is None
        assert again.readers[LAMPORTS].get(b"src") == b"7"
        assert (again.changelog_offset(ENTITIES), again.changelog_offset(LAMPORTS)) == (12, 5)
        assert again.input_offsets() == {"in": 100}
    finally:
        again.close()


def test_an_aborted_batch_leaves_no_trace_and_a_wiped_table_is_empty(tmp_path: Path, config: GuardConfig) -> None:
    """`discard` forgets the batch in progress (its transaction aborted); `wipe` empties one table's database."""
    part = PartitionState(tmp_path, _route(config), 2, {})
    try:
        part.readers[ENTITIES].put(b"a", b"1")
        part.discard()
        assert part.readers[ENTITIES].get(b"a") is None
        part.readers[LAMPORTS].put(b"s", b"1")
        part.store({LAMPORTS: 3}, {})
        part.wipe(LAMPORTS)
        assert part.readers[LAMPORTS].get(b"s") is None and part.changelog_offset(LAMPORTS) is None
    finally:
        part.close()


def test_a_batch_in_flight_is_read_under_the_batch_in_progress(tmp_path: Path, config: GuardConfig) -> None:
    """Reads go through the batch in progress, then the sealed batch in flight, then RocksDB (deletions
    included); `store(sealed=True)` writes the batch in flight alone, and `discard` drops both batches."""
    part = PartitionState(tmp_path, config.routes[0], 0, {})
    reader = part.readers[ENTITIES]
    for key in (b"a", b"b", b"c"):
        part.dbs[ENTITIES][key] = b"db"
    reader.put(b"a", b"n")
    reader.delete(b"b")
    reader.put(b"d", b"n")
    part.seal()
    reader.put(b"a", b"n+1")
    assert [reader.get(k) for k in (b"a", b"b", b"c", b"d")] == [b"n+1", None, b"db", b"n"]
    assert sorted(reader.items()) == [(b"a", b"n+1"), (b"c", b"db"), (b"d", b"n")]
    part.store({ENTITIES: 7}, {"in": 3}, sealed=True)
    assert part.dbs[ENTITIES].get(b"a") == b"n" and part.dbs[ENTITIES].get(b"b") is None
    assert part.changelog_offset(ENTITIES) == 7 and reader.get(b"a") == b"n+1"
    part.seal()
    reader.put(b"c", b"n+2")
    part.discard()
    assert [reader.get(k) for k in (b"a", b"c")] == [b"n", b"db"]


def test_stacked_batches_in_flight_are_stored_oldest_first(tmp_path: Path, config: GuardConfig) -> None:
    """at_least_once: a batch goes in flight while the one before is still in flight (`seal(stacked=True)`);
    reads see the newest write of either; storing the older one (its own writes, as `seal` returned them) leaves
    the newer one's writes readable over RocksDB, and storing that one empties the in-flight overlay."""
    part = PartitionState(tmp_path, config.routes[0], 0, {})
    try:
        reader = part.readers[ENTITIES]
        reader.put(b"a", b"1")
        reader.put(b"b", b"1")
        reader.delete(b"d")
        first = part.seal(stacked=True)
        reader.put(b"a", b"2")
        reader.put(b"c", b"2")
        reader.delete(b"d")
        second = part.seal(stacked=True)
        assert first[ENTITIES] == {b"a": b"1", b"b": b"1", b"d": None}
        assert [reader.get(k) for k in (b"a", b"b", b"c", b"d")] == [b"2", b"1", b"2", None]
        part.store({ENTITIES: 1}, {"in": 1}, sealed=first)
        assert part.dbs[ENTITIES].get(b"a") == b"1" and part.dbs[ENTITIES].get(b"c") is None
        assert [reader.get(k) for k in (b"a", b"b", b"c", b"d")] == [b"2", b"1", b"2", None]
        assert set(part.flight[ENTITIES]) == {b"a", b"c"}  # b and d (written alike by both) are in RocksDB
        part.store({ENTITIES: 2}, {"in": 2}, sealed=second)
        assert not part.flight[ENTITIES] and part.input_offsets() == {"in": 2}
        assert [part.dbs[ENTITIES].get(k) for k in (b"a", b"b", b"c")] == [b"2", b"1", b"2"]
        reader.put(b"a", b"3")
        part.seal()
        reader.put(b"a", b"4")
        with pytest.raises(AssertionError):  # exactly_once: one batch in flight at most
            part.seal()
    finally:
        part.close()


HOUR_MS = 3_600_000


def _reuse(stored: int | None, stored_at: int | None, begin: int = 0, end: int = 100, *, now: int = 100 * HOUR_MS,
           retention: int = DEFAULT_DELETE_RETENTION_MS) -> bool:
    return stale_reason(stored, stored_at, begin, end, now_ms=now, retention_ms=retention) is None


def test_a_local_database_is_brought_forward_only_while_its_changelogs_tombstones_must_still_be_there() -> None:
    """Issue 20: compaction drops a tombstone once it is delete.retention.ms old, so a database that last stored
    longer ago may miss a delete written after its offset. It is reused (replayed from its offset) only when it
    stored at most half the retention ago, or nothing was written after its offset; no time (a data dir of an
    earlier release), a time in the future, or a changelog that no longer reaches back to it: restored from the
    beginning."""
    now = 100 * HOUR_MS
    assert _reuse(50, now - 1 * HOUR_MS), "stored an hour ago, 24 h retention"
    assert _reuse(50, now - 12 * HOUR_MS)
    assert not _reuse(50, now - 12 * HOUR_MS - 1), "past half the retention"
    assert not _reuse(50, now - 25 * HOUR_MS), "past the retention: a tombstone may be gone"
    assert not _reuse(50, now - 2_000, retention=1_000), "the topic's own retention counts"
    assert _reuse(50, now - 400, retention=1_000)
    assert not _reuse(50, None), "no time recorded: fail-safe"
    assert _reuse(99, None), "nothing after its offset (end 100): nothing can have been removed"
    assert _reuse(99, now - 1000 * HOUR_MS)
    assert _reuse(50, now + CLOCK_SLACK_MS), "the clock went back a little"
    assert not _reuse(50, now + CLOCK_SLACK_MS + 1), "stored in the future: its age is unknown"
    assert not _reuse(50, now, begin=60), "records after its offset were deleted"
    assert _reuse(50, now, begin=51)
    assert not _reuse(100, now) and not _reuse(150, now), "at or past the end: recreated changelog"
    assert not _reuse(None, now)


def test_a_store_and_a_restore_record_when_the_partition_held_its_changelogs_end(tmp_path: Path,
                                                                                 config: GuardConfig) -> None:
    """Every store writes the wall-clock time with the input offsets (state_by_entity, last), also a store of a
    batch that changed nothing; it is not a key of the table."""
    part = PartitionState(tmp_path, _route(config), 0, {})
    try:
        assert part.stored_at() is None
        before = int(time.time() * 1000)
        part.readers[LAMPORTS].put(b"s", b"1")
        part.store({LAMPORTS: 3}, {})
        stored = part.stored_at()
        assert stored is not None and before <= stored <= int(time.time() * 1000)
        assert part.readers[ENTITIES].items() == [], "the time is not a key of the table"
        part.mark_stored_at(5)
        assert part.stored_at() == 5
    finally:
        part.close()
