"""app/runtime/watermarks.py without a broker: the chains of stages built from the configuration, and a round
of side reads over stand-ins for the side consumer and the admin client (on the broker:
tests/integration/test_audit.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from app.runtime import watermarks
from app.runtime.watermarks import SourceDrains, chains
from tests.unit.test_runtime_stages import _config

JOINS = [TopicPartition("app-audit-paid-repartition", p) for p in range(5)]


def test_the_chains_follow_each_verified_partition_through_the_route_that_writes_it(tmp_path: Path) -> None:
    """For a repartitioning route the chain of a verified partition starts at every partition of the route's
    inputs, then its repartition topic's partition of that number, then the verified partition, then every
    partition of the rule's repartition topic; a plain route's starts at its inputs' partition of that number."""
    config = _config(tmp_path)
    found = chains("app", config, {"out": [0, 1, 2], "in": [0, 1], "in2": [0]})
    assert sorted(found) == [("out", 0), ("out", 1), ("out", 2)]
    first, verify, verified, joins = found[("out", 1)]
    assert first == {("in", 0), ("in", 1), ("in2", 0)}
    assert verify == {("app-r-entities-repartition", 1)} and verified == {("out", 1)}
    assert joins == {(tp.topic, tp.partition) for tp in JOINS}


class _Broker:
    """What the side consumer and the admin client answer: end offsets and the group's committed offsets (one
    offset for every partition asked), or an error while `down`."""

    def __init__(self, end: int, committed: int) -> None:
        self.end, self.committed, self.down = end, committed, False
        self.groups: list[str] = []

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        if self.down:
            raise ConnectionError("broker out of reach")
        return dict.fromkeys(tps, self.end)

    async def list_consumer_group_offsets(self, group: str, *, partitions: list[TopicPartition]) -> dict[Any, Any]:
        self.groups.append(group)
        return {tp: SimpleNamespace(offset=self.committed) for tp in partitions}


def _drains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker: _Broker) -> SourceDrains:
    async def partitions(consumer: Any, topics: list[str], **_: Any) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t in topics for p in range(3 if t == "out" else 2)]

    monkeypatch.setattr(watermarks, "topic_partitions", partitions)
    drains = SourceDrains("app", _config(tmp_path), "-", "app-verify")
    drains._consumer, drains._admin = broker, broker  # type: ignore[assignment]
    return drains


def test_a_round_of_reads_drains_every_source_whose_stages_committed_up_to_their_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round over a pipeline whose every stage committed up to its end drains every source partition of the
    rule into every join partition through the round's start, from the worker group's committed offsets; one
    with a backlog drains nothing."""
    behind = _drains(tmp_path, monkeypatch, _Broker(end=10, committed=9))
    asyncio.run(behind.refresh())
    assert behind.sources == {"paid": (("out", 0), ("out", 1), ("out", 2))}
    assert all(behind.through(source, join) is None for source in behind.sources["paid"] for join in JOINS)
    broker = _Broker(end=10, committed=10)
    drains = _drains(tmp_path, monkeypatch, broker)
    asyncio.run(drains.refresh())
    assert all(drains.through(source, join) is not None for source in drains.sources["paid"] for join in JOINS)
    assert set(broker.groups) == {"app-verify"}


def test_while_the_broker_does_not_answer_nothing_is_drained_and_a_warning_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Reads that fail leave every source where it was (the joins' windows wait: late, never early), set `failing`
    and log one warning; once they answer again the sources move on."""
    broker = _Broker(end=10, committed=10)
    drains = _drains(tmp_path, monkeypatch, broker)
    drains.interval = 0.01
    asyncio.run(drains.refresh())
    before = drains.through(("out", 0), JOINS[0])
    broker.down = True

    async def run_for(seconds: float) -> None:
        drains.start()
        await asyncio.sleep(seconds)
        await drains.stop()

    monkeypatch.setattr(drains, "_clients", lambda: _answer((broker, broker)))
    asyncio.run(run_for(0.2))
    assert drains.failing and drains.through(("out", 0), JOINS[0]) == before
    assert len([r for r in caplog.records if "cannot be read" in r.getMessage()]) == 1
    broker.down = False
    asyncio.run(run_for(0.2))
    assert not drains.failing and (drains.through(("out", 0), JOINS[0]) or 0) > (before or 0)


async def _answer(value: Any) -> Any:
    return value


def test_a_stop_whose_cancellation_meets_the_end_of_a_round_of_reads_still_ends_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop that cancels the reads just as a round ends still ends them (Python 3.11's `asyncio.wait_for` then
    returns the round's result instead of the cancellation)."""
    drains = _drains(tmp_path, monkeypatch, _Broker(end=10, committed=10))
    drains.interval = 0.01
    stopping: list[asyncio.Future[None]] = []
    asked = asyncio.Event()

    async def refresh() -> None:
        if not stopping:
            stopping.append(asyncio.ensure_future(drains.stop()))
            asked.set()
            await asyncio.sleep(0)  # the stop cancels the reads' task; this round ends before that task sees it

    monkeypatch.setattr(drains, "refresh", refresh)

    async def main() -> bool:
        drains.start()
        await asked.wait()
        done, _ = await asyncio.wait(stopping, timeout=5)
        drains._stopping = True  # a stop that did not end: end the reads anyway, so the test fails, not hangs
        return bool(done)

    assert asyncio.run(main()), "the reads went on after the stop"
