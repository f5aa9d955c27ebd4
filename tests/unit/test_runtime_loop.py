"""How the batched runtime's loop takes the records of a step and commits behind it (at_least_once): the
decisions alone, against a stand-in for aiokafka's consumer (the runtime on the broker: tests/integration/
test_runtime_batched.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError

from app.runtime.loop import STALE_MS, BatchedRuntime
from byzguard.config import GuardConfig, load
from byzguard.guard import Guard

TP0, TP1 = TopicPartition("in", 0), TopicPartition("in", 1)


@pytest.fixture
def runtime(tmp_path: Path) -> BatchedRuntime:
    path = tmp_path / "byzguard.yaml"
    path.write_text("routes:\n  - {name: r, inputs: [in], verified_topic: out, quarantine_topic: bad,\n"
                    "      partitions: 2, types: {t: {}}}\n")
    config: GuardConfig = load(path)
    runtime = BatchedRuntime(
        app_id="app", bootstrap="127.0.0.1:9", config=config, guard=Guard(config), tabledir=tmp_path,
        store_options={}, guarantee="at_least_once", batch_max_records=10, batch_max_ms=10, session_timeout=10,
        fetch_min_bytes=1, fetch_max_wait_ms=7, producer={})
    runtime.positions = {TP0: 0, TP1: 0}
    return runtime


class Msg:
    def __init__(self, offset: int, age_ms: float) -> None:
        self.offset = offset
        self.timestamp = int(time.time() * 1000 - age_ms)


class Consumer:
    """getmany answers in turn, and the calls it got; commit records its offsets (or fails once)."""

    def __init__(self, *answers: dict[TopicPartition, list[Msg]], fail_commit: bool = False) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[int, int]] = []
        self.committed: list[dict[TopicPartition, int]] = []
        self.in_flight = 0
        self.fail_commit = fail_commit

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Msg]]:
        self.calls.append((timeout_ms, max_records))
        return self.answers.pop(0) if self.answers else {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.in_flight += 1
        assert self.in_flight == 1, "two commits in flight"
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        if self.fail_commit:
            raise CommitFailedError("rebalanced")
        self.committed.append(offsets)


async def test_fresh_records_run_at_once(runtime: BatchedRuntime) -> None:
    """Records that reached the broker a moment ago run in the step as they are: no second fetch waits."""
    consumer = Consumer({TP0: [Msg(0, 1), Msg(1, 0)]}, {TP1: [Msg(0, 0)]})
    fetched = await runtime._fetch(consumer)  # type: ignore[arg-type]
    assert [m.offset for m in fetched[TP0]] == [0, 1] and TP1 not in fetched
    assert consumer.calls == [(200, 20)]


async def test_a_step_old_buffer_takes_what_the_broker_has_since(runtime: BatchedRuntime) -> None:
    """Where the newest record aiokafka held is older than STALE_MS, what the broker got since joins the same
    step, after it in offset order, within the rest of the step's budget and the fetch's max wait."""
    old = STALE_MS * 4
    consumer = Consumer({TP0: [Msg(0, old), Msg(1, old)]}, {TP0: [Msg(2, 1)], TP1: [Msg(0, 1)]})
    fetched = await runtime._fetch(consumer)  # type: ignore[arg-type]
    assert [m.offset for m in fetched[TP0]] == [0, 1, 2] and [m.offset for m in fetched[TP1]] == [0]
    assert consumer.calls == [(200, 20), (7, 18)]


async def test_a_full_step_fetches_no_more(runtime: BatchedRuntime) -> None:
    """A step that already holds its budget of records (a backlog) does not fetch again, however old they are."""
    consumer = Consumer({TP0: [Msg(i, 1000) for i in range(10)], TP1: [Msg(i, 1000) for i in range(10)]})
    fetched = await runtime._fetch(consumer)  # type: ignore[arg-type]
    assert sum(map(len, fetched.values())) == 20 and len(consumer.calls) == 1


async def test_offsets_are_committed_behind_the_loop_one_at_a_time_in_order(runtime: BatchedRuntime) -> None:
    """at_least_once commits run while the loop goes on, at most one in flight, in the order of the steps; a
    revoke or a stop waits for the one in flight."""
    consumer = Consumer()
    c: Any = consumer
    await runtime._commit(c, {TP0: 5})
    assert consumer.committed == []  # not waited for
    await runtime._commit(c, {TP0: 9})  # waits for the first
    assert consumer.committed == [{TP0: 5}]
    await runtime._committed()
    assert consumer.committed == [{TP0: 5}, {TP0: 9}] and runtime._committing is None


async def test_a_commit_a_rebalance_refused_is_no_failure(runtime: BatchedRuntime) -> None:
    """A commit refused because the group rebalanced is logged, not raised: the state stored with its offsets
    covers it (the worker resumes from the larger of both)."""
    c: Any = Consumer(fail_commit=True)
    await runtime._commit(c, {TP0: 5})
    await runtime._committed()
    assert c.committed == []
