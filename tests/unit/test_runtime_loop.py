"""How the batched runtime's loop takes the records of a step, keeps one batch per partition in flight while it
processes the next, and commits behind it (at_least_once): the decisions alone, against stand-ins for aiokafka's
consumer and producer (the runtime on the broker: tests/integration/test_runtime_batched.py)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, ConsumerStoppedError, KafkaError

from app.runtime.batches import RecordBatches
from app.runtime.loop import PACE_RECORDS, RATE_WINDOW_S, STALE_MS, BatchedRuntime, Key
from app.runtime.stages import begin, commit, transact
from app.runtime.state import PartitionState
from byzguard.config import GuardConfig, load
from byzguard.guard import ENTITIES, LAMPORTS, Guard

TP0, TP1 = TopicPartition("in", 0), TopicPartition("in", 1)


def _runtime(tmp_path: Path, guarantee: str, *, overlap: bool = True, **options: Any) -> BatchedRuntime:
    path = tmp_path / "byzguard.yaml"
    path.write_text("routes:\n  - {name: r, inputs: [in], verified_topic: out, quarantine_topic: bad,\n"
                    "      partitions: 2, types: {t: {}}}\n")
    config: GuardConfig = load(path)
    runtime = BatchedRuntime(
        app_id="app", bootstrap="127.0.0.1:9", config=config, guard=Guard(config), tabledir=tmp_path,
        store_options={}, guarantee=guarantee, batch_max_records=10, batch_max_ms=10, session_timeout=10,
        fetch_min_bytes=1, fetch_max_wait_ms=7, producer={}, batch_overlap=overlap, **options)
    runtime.positions = {TP0: 0, TP1: 0}
    return runtime


@pytest.fixture
def runtime(tmp_path: Path) -> BatchedRuntime:
    return _runtime(tmp_path, "at_least_once")


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

    async def position(self, tp: TopicPartition) -> int:
        return 0

    async def stop(self) -> None:
        assert self.in_flight == 0, "stopped with a commit in flight"
        self.stopped = [dict(c) for c in self.committed]


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


class Stopping(Consumer):
    """aiokafka's getmany: a call in progress when the consumer stops returns what it holds; a call made after
    raises ConsumerStoppedError. The stop begins while the first call waits (on_stop does not wait for `_fetch`)."""

    def __init__(self, runtime: BatchedRuntime, *answers: dict[TopicPartition, list[Msg]]) -> None:
        super().__init__(*answers)
        self.runtime, self.closed = runtime, False

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Msg]]:
        if self.closed:
            raise ConsumerStoppedError()
        self.runtime._stopping = self.closed = True
        return await super().getmany(timeout_ms=timeout_ms, max_records=max_records)


async def test_a_stop_during_the_fetch_asks_the_stopped_consumer_for_no_more(runtime: BatchedRuntime) -> None:
    """A step-old buffer returned while the worker stops is the step's whole fetch: no second getmany on a
    consumer that is stopping (it would raise, and a clean stop would end as a failure)."""
    old = STALE_MS * 4
    consumer = Stopping(runtime, {TP0: [Msg(0, old)]}, {TP0: [Msg(1, 1)]})
    fetched = await runtime._fetch(consumer)  # type: ignore[arg-type]
    assert [m.offset for m in fetched[TP0]] == [0] and len(consumer.calls) == 1


class Fetches(Consumer):
    """A consumer whose every fetch returns `records` records of the input after `wait` s (at once and empty by
    default), and the time each began."""

    def __init__(self, records: int = 0, wait: float = 0.0) -> None:
        super().__init__()
        self.at: list[float] = []
        self.records, self.wait = records, wait
        self.offset = 0

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Msg]]:
        self.at.append(time.monotonic())
        await asyncio.sleep(self.wait)
        if not self.records:
            return {}
        self.offset += self.records
        return {TP0: [Msg(offset, 0) for offset in range(self.offset - self.records, self.offset)]}

    def highwater(self, tp: TopicPartition) -> int | None:
        return None


async def _fetch_times(runtime: BatchedRuntime, seconds: float, consumer: Fetches | None = None) -> list[float]:
    """The loop run for `seconds`, then stopped as on_stop does (it takes the consumer); when each fetch began.
    Its steps do nothing (the records fetched are only counted)."""
    consumer = consumer or Fetches()
    runtime.consumer = cast(Any, consumer)
    runtime.positions = {}

    async def step(fetched: dict[TopicPartition, list[Msg]]) -> None:
        await asyncio.sleep(0)

    runtime._step = step  # type: ignore[method-assign]
    running = asyncio.ensure_future(BatchedRuntime._run(runtime))  # type: ignore[arg-type]  # mode's ServiceTask
    await asyncio.sleep(seconds)
    runtime._stopping, runtime.consumer = True, None
    await asyncio.wait_for(running, 1)
    return consumer.at


@pytest.mark.parametrize("interval_ms", [0.0, 20.0])
async def test_the_loop_fetches_at_most_once_per_step_interval(tmp_path: Path, interval_ms: float) -> None:
    """With `step_interval_ms` the loop starts a fetch at most once per interval, however fast the one before
    returned, while its input comes fast (fewer, larger steps under load); with 0, right after each step."""
    runtime = _runtime(tmp_path, "at_least_once", step_interval_ms=interval_ms)
    at = await _fetch_times(runtime, 0.2, Fetches(records=PACE_RECORDS))
    gaps = [later - earlier for earlier, later in itertools.pairwise(at)]
    if interval_ms:
        assert 5 <= len(at) <= 11 and min(gaps) >= interval_ms / 1000 - 0.001, gaps
    else:
        assert len(at) > 50


async def test_below_the_pacing_rate_the_loop_fetches_right_after_each_step(tmp_path: Path) -> None:
    """An input slower than PACE_RECORDS records per step interval (here one record every ~5 ms: 4 per 20-ms
    interval) does not wait for the interval: the next fetch begins right after the step, so a record the
    worker gets is not held up to an interval; once the input comes faster, the interval binds again."""
    runtime = _runtime(tmp_path, "at_least_once", step_interval_ms=20.0)
    at = await _fetch_times(runtime, 0.4, Fetches(records=1, wait=0.005))
    late = [later - earlier for earlier, later in itertools.pairwise(at) if earlier - at[0] > RATE_WINDOW_S]
    # Paced, they would be 20 ms apart: ~15 in the last 0.3 s.
    assert len(late) > 20 and sorted(late)[len(late) // 2] < 0.012, late
    runtime._stopping = False
    at = await _fetch_times(runtime, 0.4, Fetches(records=2 * PACE_RECORDS, wait=0.005))
    late = [later - earlier for earlier, later in itertools.pairwise(at) if earlier - at[0] > 2 * RATE_WINDOW_S]
    assert min(late) >= 0.019 and len(late) <= 12, late  # at most one per 20 ms over the last 0.2 s


async def test_a_stop_while_the_loop_waits_for_its_next_step_fetches_no_more(tmp_path: Path) -> None:
    """A stop that begins while the loop waits out the step interval (on_stop takes the consumer and stops it)
    ends the loop: it never fetches from the consumer it read before the wait, which aiokafka would refuse."""
    runtime = _runtime(tmp_path, "at_least_once", step_interval_ms=100.0)
    at = await _fetch_times(runtime, 0.03)  # the stop comes while the loop waits for its second step
    assert len(at) == 1 and not runtime._failed


async def test_offsets_are_committed_behind_the_loop_one_at_a_time_in_order(runtime: BatchedRuntime) -> None:
    """at_least_once commits run while the loop goes on, at most one in flight, in the order of the steps (the
    offsets stored while one is in flight go together in the next); a revoke or a stop waits for them."""
    consumer = Consumer()
    c: Any = consumer
    runtime._commit(c, {TP0: 5})
    await asyncio.sleep(0)  # its commit is on its way
    runtime._commit(c, {TP0: 7, TP1: 2})
    runtime._commit(c, {TP0: 9})
    assert consumer.committed == []  # not waited for
    await runtime._committed()
    assert consumer.committed == [{TP0: 5}, {TP0: 9, TP1: 2}] and runtime._committing is None


async def test_a_commit_a_rebalance_refused_is_no_failure(runtime: BatchedRuntime) -> None:
    """A commit refused because the group rebalanced is logged, not raised: the state stored with its offsets
    covers it (the worker resumes from the larger of both)."""
    c: Any = Consumer(fail_commit=True)
    runtime._commit(c, {TP0: 5})
    await runtime._committed()
    assert c.committed == [] and not runtime._failed


async def test_with_a_commit_interval_one_commit_per_interval_goes_and_the_last_offsets_follow_alone(
        runtime: BatchedRuntime) -> None:
    """at_least_once with `commit_interval`: a commit goes at once, the next only once the interval since it
    passed, with every offset stored meanwhile; offsets stored after the last batch are committed when the interval
    ends, without another batch to carry them."""
    runtime.commit_interval = 0.2
    consumer = Consumer()
    c: Any = consumer
    started = time.monotonic()
    runtime._commit(c, {TP0: 5})
    await asyncio.sleep(0.05)
    assert consumer.committed == [{TP0: 5}]  # the first at once
    runtime._commit(c, {TP0: 7, TP1: 2})
    await asyncio.sleep(0.05)
    runtime._commit(c, {TP0: 9})
    assert consumer.committed == [{TP0: 5}]  # within the interval: none
    assert runtime._committing is not None
    await asyncio.wait_for(runtime._committing, 1)  # no other batch comes
    assert consumer.committed == [{TP0: 5}, {TP0: 9, TP1: 2}]
    assert time.monotonic() - started >= 0.2


async def test_a_revoke_or_a_stop_commits_at_once_whatever_the_interval(runtime: BatchedRuntime) -> None:
    """Offsets stored within the commit interval are committed at once when a revoke or a stop waits for the
    commits (`_committed`), not at the end of the interval; the interval applies again after."""
    runtime.commit_interval = 30.0
    consumer = Consumer()
    c: Any = consumer
    runtime._commit(c, {TP0: 5})
    await asyncio.sleep(0.05)
    runtime._commit(c, {TP0: 8})
    await asyncio.wait_for(runtime._committed(), 1)
    assert consumer.committed == [{TP0: 5}, {TP0: 8}] and runtime._committing is None
    runtime._commit(c, {TP0: 9})
    await asyncio.sleep(0.05)
    assert consumer.committed[-1] == {TP0: 8}  # the interval again
    await asyncio.wait_for(runtime._committed(), 1)
    assert consumer.committed[-1] == {TP0: 9}


# -- batches in flight -------------------------------------------------------------------------------------------

KEY = ("r", 0)


class Builder:
    """aiokafka's record batch builder, as RecordBatches uses it."""

    def __init__(self) -> None:
        self.keys: list[bytes | None] = []

    def append(self, *, timestamp: Any, key: bytes | None, value: bytes | None, headers: Any) -> bool:
        self.keys.append(key)
        return True

    def record_count(self) -> int:
        return len(self.keys)


class Producer:
    """aiokafka's producer as the runtime uses it: every batch sent is delivered once `gate` is open (a topic,
    or `topic[partition]`, in `held`: once its own event is; in `refused`: never); `log` has what happened in order
    (sent, delivered; begin, offsets, commit, abort of a transaction)."""

    def __init__(self, *, fail_commit: bool = False) -> None:
        self.gate = asyncio.Event()
        self.held: dict[str, asyncio.Event] = {}
        self.refused: set[str] = set()
        self.log: list[tuple[str, ...]] = []
        self.next: dict[tuple[str, int], int] = defaultdict(int)
        self.fail_commit = fail_commit
        #: What the runtime drives a transaction through (aiokafka's TransactionManager: `begin`, `transact`).
        self._txn_manager = Manager(self)

    def create_batch(self) -> Builder:
        return Builder()

    async def send_batch(self, batch: Builder, topic: str, partition: int) -> asyncio.Future[Any]:
        keys = ",".join(k.decode() for k in batch.keys if k is not None)
        self.log.append(("sent", topic, keys))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def land() -> None:
            await self.held.get(f"{topic}[{partition}]", self.held.get(topic, self.gate)).wait()
            if topic in self.refused or f"{topic}[{partition}]" in self.refused:
                fut.set_exception(KafkaError(f"{topic} refused"))
                return
            self.log.append(("delivered", topic, keys))
            fut.set_result(SimpleNamespace(offset=self.next[(topic, partition)]))
            self.next[(topic, partition)] += batch.record_count()

        self._landing = asyncio.ensure_future(land())
        return fut

    async def begin_transaction(self) -> None:
        self.log.append(("begin",))

    def offsets_future(self, offsets: dict[TopicPartition, Any]) -> asyncio.Future[None]:
        """The offsets handed to the transaction (the manager's add_offsets_to_txn): their answer's future."""
        self.log.append(("offsets", str(offsets[TP0].offset)))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def commit_transaction(self) -> None:
        await self.gate.wait()
        if self.fail_commit:
            raise KafkaError("the transaction failed")
        self.log.append(("commit",))

    async def abort_transaction(self) -> None:
        self.log.append(("abort",))

    async def stop(self) -> None:
        self.log.append(("stop",))


class Manager:
    """aiokafka's TransactionManager as the runtime drives it, over a fake producer: the offsets and the commit are
    handed over without a wait (`add_offsets_to_txn`, `committing_transaction`), the commit is waited for after."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.ended: asyncio.Future[None] | None = None

    def has_pid(self) -> bool:
        return True

    def begin_transaction(self) -> None:
        self.producer.log.append(("begin",))

    def is_in_transaction(self) -> bool:
        return True

    def add_offsets_to_txn(self, offsets: dict[TopicPartition, Any], group: str) -> asyncio.Future[None]:
        return self.producer.offsets_future(offsets)

    def committing_transaction(self) -> None:
        self.ended = asyncio.ensure_future(self.producer.commit_transaction())

    def wait_for_transaction_end(self) -> asyncio.Future[None]:
        assert self.ended is not None
        return self.ended


def _owned(runtime: BatchedRuntime, tmp_path: Path, producer: Producer, key: Key = KEY) -> PartitionState:
    """Route partition `key` (r[0]) owned by `runtime`, its outputs going to `producer`."""
    route = runtime.routes["r"]
    part = runtime.parts[key] = PartitionState(tmp_path / "tables", route, key[1], {})
    if runtime.eos:
        runtime.txns[key] = cast(Any, producer)
    else:
        runtime.producer = cast(Any, producer)
    return part


async def _batch(runtime: BatchedRuntime, part: PartitionState, entity: bytes, value: bytes, offset: int,
                 records: int = 1, key: Key = KEY) -> None:
    """One batch of `key` (r[0]) as `_partition` makes it: its record read the entity's state, wrote it, and put
    its output in the batch; then `_finish`."""
    out = runtime._batches(key)
    part.readers[ENTITIES].put(entity, value)
    out.add("out", key[1], entity, value)
    tp = TopicPartition("in", key[1])
    await asyncio.wait_for(runtime._finish(key, runtime.routes["r"], part, out, {tp: offset}, records), 1)


async def test_a_batch_reads_the_state_of_the_batch_in_flight(runtime: BatchedRuntime, tmp_path: Path) -> None:
    """The loop goes on while a batch is delivered: the next batch's records read the state the batch in flight
    wrote (not yet in RocksDB), its own writes over it; RocksDB gets it once its outputs and changelog are
    delivered."""
    producer = Producer()
    part = _owned(runtime, tmp_path, producer)
    await _batch(runtime, part, b"e", b"v1", 1)  # returns with its outputs on their way
    assert producer.log == [("sent", "out", "e")]
    reader = part.readers[ENTITIES]
    assert reader.get(b"e") == b"v1" and part.dbs[ENTITIES].get(b"e") is None
    reader.put(b"e", b"v2")
    assert reader.get(b"e") == b"v2" and dict(reader.items()) == {b"e": b"v2"}
    producer.gate.set()
    await runtime._landed_all()
    assert part.dbs[ENTITIES].get(b"e") == b"v1" and reader.get(b"e") == b"v2"


async def test_batches_of_a_partition_are_delivered_and_stored_in_order(runtime: BatchedRuntime,
                                                                        tmp_path: Path) -> None:
    """at_least_once: a batch's outputs, then its changelog, then its store, then its offsets' commit; the
    batches processed meanwhile wait, as one batch, which goes in flight once the outputs of the one before are
    delivered and the one before that is stored: its outputs go while the changelog of the one before is on its
    way, its changelog and its store only once that one is stored."""
    producer, changelog, part, consumer = _changelog_held(runtime, tmp_path)
    await _batch(runtime, part, b"a", b"1", 1)
    await _batch(runtime, part, b"b", b"2", 2)  # processed while the first is in flight: it waits
    await asyncio.sleep(0.02)  # its outputs go once those of the first are delivered, beside their changelog
    await _batch(runtime, part, b"c", b"3", 3)  # it waits until the first is stored
    await asyncio.sleep(0.02)
    log = producer.log
    assert log == [("sent", "out", "a"), ("delivered", "out", "a"), ("sent", changelog, "a"),
                   ("sent", "out", "b"), ("delivered", "out", "b")]
    assert part.dbs[ENTITIES].get(b"a") is None and consumer.committed == []
    assert part.readers[ENTITIES].get(b"a") == b"1" and part.readers[ENTITIES].get(b"c") == b"3"
    producer.held[changelog].set()
    await runtime._landed_all()
    await runtime._committed()
    assert [e for e in log if e[1] == changelog] == [("sent", changelog, k) if i % 2 == 0 else
                                                     ("delivered", changelog, k)
                                                     for i, k in enumerate("aabbcc")]
    assert [e for e in log if e[1] == "out" and e[0] == "sent"] == [("sent", "out", k) for k in "abc"]
    for k, before in (("b", "a"), ("c", "b")):  # each changelog after its outputs and the changelog before
        sent = log.index(("sent", changelog, k))
        assert sent > log.index(("delivered", "out", k)) and sent > log.index(("delivered", changelog, before))
    assert log.index(("sent", "out", "c")) > log.index(("delivered", changelog, "a"))
    assert not any(part.flight.values())  # every batch stored: nothing left in the in-flight overlay
    assert part.dbs[ENTITIES].get(b"c") == b"3" and part.input_offsets() == {"in": 3}
    assert [c[TP0] for c in consumer.committed][-1] == 3


async def test_without_overlap_the_next_batch_goes_once_the_one_before_is_stored(tmp_path: Path) -> None:
    """at_least_once with BYZGUARD_BATCH_OVERLAP=false: the batches processed while one is in flight wait, as one
    batch, until it is stored (its outputs, then its changelog delivered): one batch in flight."""
    runtime = _runtime(tmp_path, "at_least_once", overlap=False)
    producer, changelog, part, _ = _changelog_held(runtime, tmp_path)
    await _batch(runtime, part, b"a", b"1", 1)
    await _batch(runtime, part, b"b", b"2", 2)
    await asyncio.sleep(0.02)
    await _batch(runtime, part, b"c", b"3", 3)
    await asyncio.sleep(0.02)
    assert producer.log == [("sent", "out", "a"), ("delivered", "out", "a"), ("sent", changelog, "a")]
    producer.held[changelog].set()
    await runtime._landed_all()
    assert producer.log[3:] == [("delivered", changelog, "a"), ("sent", "out", "b,c"), ("delivered", "out", "b,c"),
                                ("sent", changelog, "b,c"), ("delivered", changelog, "b,c")]
    assert part.dbs[ENTITIES].get(b"c") == b"3" and not any(part.flight.values())


async def test_a_full_waiting_batch_holds_the_loop(runtime: BatchedRuntime, tmp_path: Path) -> None:
    """A waiting batch that holds `batch_max_records` records makes the loop wait for the batch in flight (it
    fetches no further ahead), then goes in flight itself."""
    producer = Producer()
    part = _owned(runtime, tmp_path, producer)
    await _batch(runtime, part, b"a", b"1", 1)
    await _batch(runtime, part, b"b", b"2", 2, records=9)
    full = asyncio.ensure_future(_batch(runtime, part, b"c", b"3", 3, records=1))
    await asyncio.sleep(0.02)
    assert not full.done()
    producer.gate.set()
    await full
    assert ("sent", "out", "b,c") in producer.log and KEY not in runtime.waiting


async def test_outputs_not_delivered_stop_the_batches_after_them(runtime: BatchedRuntime, tmp_path: Path) -> None:
    """at_least_once: where a batch's outputs are not delivered, neither its changelog nor its state nor
    anything of the batch waiting for it goes anywhere, and the worker stops."""
    producer = Producer()
    producer.refused.add("out")
    part = _owned(runtime, tmp_path, producer)
    failed: list[BaseException] = []
    runtime.crash = lambda exc: failed.append(exc) or asyncio.sleep(0)  # type: ignore[method-assign]
    await _batch(runtime, part, b"a", b"1", 1)
    await _batch(runtime, part, b"b", b"2", 2)
    producer.gate.set()
    await asyncio.sleep(0.02)
    with pytest.raises(KafkaError):
        await _batch(runtime, part, b"c", b"3", 3)
    assert producer.log == [("sent", "out", "a")]
    assert part.dbs[ENTITIES].get(b"a") is None and runtime._failed and len(failed) == 1


async def test_a_failed_transaction_discards_the_batch_built_on_it(tmp_path: Path) -> None:
    """exactly_once: the waiting batch's transaction begins only once the one in flight committed; where that
    one fails, it is aborted, the waiting batch (built on its state) is discarded and never sent, and the worker
    stops."""
    runtime = _runtime(tmp_path, "exactly_once")
    producer = Producer(fail_commit=True)
    part = _owned(runtime, tmp_path, producer)
    failed: list[BaseException] = []
    runtime.crash = lambda exc: failed.append(exc) or asyncio.sleep(0)  # type: ignore[method-assign]
    await _batch(runtime, part, b"a", b"1", 1)
    await _batch(runtime, part, b"a", b"2", 2)  # waits, reading the state of the first
    assert producer.log.count(("begin",)) == 1 and part.readers[ENTITIES].get(b"a") == b"2"
    producer.gate.set()
    await asyncio.sleep(0.02)
    assert producer.log.count(("begin",)) == 1 and ("abort",) in producer.log
    assert [e for e in producer.log if e[0] == "sent" and e[1] == "out"] == [("sent", "out", "a")]
    assert part.readers[ENTITIES].get(b"a") is None and part.dbs[ENTITIES].get(b"a") is None
    assert runtime._failed and len(failed) == 1
    with pytest.raises(KafkaError):  # a batch after it goes nowhere either
        await _batch(runtime, part, b"a", b"3", 3)


class Txn(Producer):
    """A transactional producer as aiokafka's sender drives it: the offsets are handed over at once and answered
    once `offsets_in` is set (or refused there: `refuse_offsets`); the commit (EndTxn) goes only after them."""

    def __init__(self, *, refuse_offsets: bool = False) -> None:
        super().__init__()
        self.offsets_in = asyncio.Event()
        self.refuse_offsets = refuse_offsets

    def offsets_future(self, offsets: dict[TopicPartition, Any]) -> asyncio.Future[None]:
        self.log.append(("offsets", str(offsets[TP0].offset)))
        return asyncio.ensure_future(self._offsets_answer())

    async def _offsets_answer(self) -> None:
        if self.refuse_offsets:
            raise KafkaError("offsets refused")
        await self.offsets_in.wait()
        self.log.append(("offsets in",))

    async def commit_transaction(self) -> None:
        self.log.append(("commit asked",))
        if self.refuse_offsets:  # aiokafka's sender never sends EndTxn after refused offsets; the commit fails
            raise KafkaError("offsets refused")
        await self.offsets_in.wait()
        self.log.append(("commit",))


async def test_the_commit_is_asked_for_once_the_records_are_delivered_while_the_offsets_are_on_their_way() -> None:
    """exactly_once: the offsets join once the records are delivered (a produce beside AddOffsetsToTxn is answered
    late by a verifying broker), and the commit is asked for right after, not after the offsets' answer (EndTxn
    follows the offsets' requests from aiokafka's sender); never before the records are delivered (aiokafka would
    commit without a batch it failed to deliver)."""
    txn = Txn()
    out = RecordBatches(txn)
    out.add("out", 0, b"a", b"1")
    task = asyncio.ensure_future(transact(cast(Any, txn), out, {TP0: 5}, "g"))
    await asyncio.sleep(0.01)
    assert txn.log == [("sent", "out", "a")]  # not delivered yet: neither offsets nor commit
    txn.gate.set()
    await asyncio.sleep(0.01)
    assert txn.log[1:] == [("delivered", "out", "a"), ("offsets", "5"), ("commit asked",)] and not task.done()
    txn.offsets_in.set()
    assert await asyncio.wait_for(task, 1) == {("out", 0): 0}
    assert txn.log[-2:] == [("offsets in",), ("commit",)]


class Answered(Txn):
    """A transactional producer whose batches are answered when the test says (`answers`, in the order sent)."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[asyncio.Future[Any]] = []

    async def send_batch(self, batch: Builder, topic: str, partition: int) -> asyncio.Future[Any]:
        self.log.append(("sent", topic, str(partition)))
        self.answers.append(asyncio.get_running_loop().create_future())
        return self.answers[-1]


async def test_the_offsets_and_the_commit_are_handed_over_by_the_last_answer_not_by_the_task() -> None:
    """exactly_once: the offsets and the commit go to the sender from the callback of the transaction's last record
    batch answered, in the turn of the loop right after the answer, not once the task waiting for the records
    resumed (more turns of a busy loop); not while a batch is unanswered; not at all where one was refused."""
    txn = Answered()
    out = RecordBatches(txn)
    out.add("out", 0, b"a", b"1")
    out.add("out", 1, b"b", b"2")
    task = asyncio.ensure_future(transact(cast(Any, txn), out, {TP0: 5}, "g"))
    await asyncio.sleep(0.01)
    txn.answers[0].set_result(SimpleNamespace(offset=0))
    await asyncio.sleep(0.01)
    assert txn.log == [("sent", "out", "0"), ("sent", "out", "1")]  # one batch unanswered: nothing handed over
    txn.answers[1].set_result(SimpleNamespace(offset=3))
    await asyncio.sleep(0)  # one turn: the answer's callbacks ran, the transaction's task has not resumed
    assert txn.log[2:] == [("offsets", "5")] and txn._txn_manager.ended is not None  # the commit is asked for
    txn.offsets_in.set()
    assert await asyncio.wait_for(task, 1) == {("out", 0): 0, ("out", 1): 3}
    assert sorted(txn.log[3:5]) == [("commit asked",), ("offsets in",)] and txn.log[5:] == [("commit",)]
    refused = Answered()
    out = RecordBatches(refused)
    out.add("out", 0, b"a", b"1")
    out.add("out", 1, b"b", b"2")
    task = asyncio.ensure_future(transact(cast(Any, refused), out, {TP0: 5}, "g"))
    await asyncio.sleep(0.01)
    refused.answers[1].set_exception(KafkaError("out[1] refused"))
    refused.answers[0].set_result(SimpleNamespace(offset=0))
    with pytest.raises(KafkaError, match="refused"):
        await asyncio.wait_for(task, 1)
    assert refused.log == [("sent", "out", "0"), ("sent", "out", "1")] and refused._txn_manager.ended is None


async def test_a_transaction_whose_records_or_offsets_are_refused_is_never_committed() -> None:
    txn = Txn()
    txn.refused.add("out")
    txn.gate.set()
    txn.offsets_in.set()
    out = RecordBatches(txn)
    out.add("out", 0, b"a", b"1")
    with pytest.raises(KafkaError, match="out refused"):
        await transact(cast(Any, txn), out, {TP0: 5}, "g")
    refused = Txn(refuse_offsets=True)
    refused.gate.set()
    out = RecordBatches(refused)
    out.add("out", 0, b"a", b"1")
    with pytest.raises(KafkaError, match="offsets refused"):
        await transact(cast(Any, refused), out, {TP0: 5}, "g")
    assert not [e for e in txn.log if e[0].startswith("commit")] and ("commit",) not in refused.log


async def test_refused_offsets_leave_no_failure_unretrieved(caplog: pytest.LogCaptureFixture) -> None:
    """Refused offsets fail the transaction's commit too (aiokafka's transaction waiter, which its abort replaces):
    `transact` raises the offsets' error and the commit's is taken, not logged as never retrieved."""
    refused = Txn(refuse_offsets=True)
    refused.gate.set()
    out = RecordBatches(refused)
    out.add("out", 0, b"a", b"1")
    with pytest.raises(KafkaError, match="offsets refused"):
        await transact(cast(Any, refused), out, {TP0: 5}, "g")
    await asyncio.sleep(0.01)
    del refused, out
    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_a_stage_transaction_is_the_same_and_aborted_where_it_failed() -> None:
    """The stages' transactions (app/runtime/stages.py `commit`) go the same way; a failed one is aborted."""
    txn = Txn()
    txn.gate.set()
    txn.offsets_in.set()
    out = RecordBatches(txn)
    out.add("out", 0, b"a", b"1")
    assert await commit(cast(Any, txn), out, {TP0: 3}, "g") == {("out", 0): 0}
    assert txn.log == [("begin",), ("sent", "out", "a"), ("delivered", "out", "a"), ("offsets", "3"), ("offsets in",),
                       ("commit asked",), ("commit",)]
    txn.refused.add("out")
    out.add("out", 0, b"b", b"2")
    with pytest.raises(KafkaError):
        await commit(cast(Any, txn), out, {TP0: 4}, "g")
    assert txn.log[-1] == ("abort",) and ("commit asked",) not in txn.log[7:]


async def test_offsets_without_records_are_in_the_transaction_before_its_commit() -> None:
    """A batch of offsets alone (markers passed): `deliver` has nothing to wait for, the offsets still go first."""
    txn = Txn()
    txn.offsets_in.set()
    assert await transact(cast(Any, txn), RecordBatches(txn), {TP0: 7}, "g") == {}
    assert txn.log == [("offsets", "7"), ("offsets in",), ("commit asked",), ("commit",)]


def test_a_transaction_begins_without_a_turn_of_the_loop() -> None:
    """`begin` completes on its first step (aiokafka's begin_transaction awaits the producer id in a task)."""
    producer = Producer()
    with pytest.raises(StopIteration):
        begin(cast(Any, producer)).send(None)
    assert producer.log == [("begin",)]


async def test_a_step_whose_batches_all_wait_paces_the_loop(runtime: BatchedRuntime, tmp_path: Path) -> None:
    """After a step whose batches only joined waiting ones, the loop fetches again once a batch in flight
    landed, not at once; after a step that put a batch in flight it goes on at once."""
    producer = Producer()
    part = _owned(runtime, tmp_path, producer)
    await _batch(runtime, part, b"a", b"1", 1)
    assert runtime._launched and not runtime._waited
    runtime._launched = runtime._waited = False
    await _batch(runtime, part, b"b", b"2", 2)
    assert runtime._waited and not runtime._launched
    paced = asyncio.ensure_future(runtime._paced())
    await asyncio.sleep(0.02)
    assert not paced.done()
    producer.gate.set()
    await asyncio.wait_for(paced, 1)


async def test_a_batch_being_built_goes_in_flight_from_its_own_finish(runtime: BatchedRuntime,
                                                                      tmp_path: Path) -> None:
    """The loop gives way to the deliveries while it processes a batch; a batch in flight that lands meanwhile
    leaves the waiting batch alone (its records are not all processed yet): it goes, whole, from its `_finish`."""
    producer = Producer()
    part = _owned(runtime, tmp_path, producer)
    await _batch(runtime, part, b"a", b"1", 1)
    await _batch(runtime, part, b"b", b"2", 2)
    runtime._building.add(KEY)
    producer.gate.set()
    await asyncio.sleep(0.02)
    assert KEY in runtime.waiting and ("sent", "out", "b") not in producer.log
    runtime._building.discard(KEY)
    await _batch(runtime, part, b"c", b"3", 3)
    await runtime._landed_all()
    assert ("sent", "out", "b,c") in producer.log and part.input_offsets() == {"in": 3}


async def test_a_changelog_not_delivered_stops_the_batch_in_flight_beside_it_and_the_one_waiting(
        runtime: BatchedRuntime, tmp_path: Path) -> None:
    """at_least_once, two batches in flight: where the older one's changelog is not delivered, the newer one's
    outputs are out (a repeat after the restart at most) but neither batch's changelog, state or offsets go
    anywhere, the batch waiting behind them is never sent, and the worker stops."""
    producer, changelog, part, consumer = _changelog_held(runtime, tmp_path)
    producer.refused.add(changelog)
    failed = _failures(runtime)
    await _batch(runtime, part, b"a", b"1", 1)
    await _batch(runtime, part, b"b", b"2", 2)
    await asyncio.sleep(0.02)  # b in flight beside a's changelog, its outputs delivered
    await _batch(runtime, part, b"c", b"3", 3)  # waits for b
    assert ("delivered", "out", "b") in producer.log and KEY in runtime.waiting
    producer.held[changelog].set()
    await asyncio.sleep(0.02)
    assert runtime._failed and len(failed) == 1
    assert [e for e in producer.log if e[0] == "sent"] == [("sent", "out", "a"), ("sent", changelog, "a"),
                                                          ("sent", "out", "b")]
    assert [part.dbs[ENTITIES].get(k) for k in (b"a", b"b", b"c")] == [None, None, None]
    assert part.input_offsets() == {} and consumer.committed == []
    with pytest.raises(KafkaError):  # nothing after them goes either
        await _batch(runtime, part, b"d", b"4", 4)
    assert not any(e[0] == "sent" and e[2] in ("c", "c,d") for e in producer.log)


def _changelog_held(runtime: BatchedRuntime, tmp_path: Path) -> tuple[Producer, str, PartitionState, Consumer]:
    """An owned partition whose entity changelog deliveries wait for `producer.held[changelog]` (outputs go at once),
    and the runtime's consumer stand-in."""
    producer = Producer()
    changelog = runtime.changelogs["r"][ENTITIES]
    producer.held[changelog] = asyncio.Event()
    producer.gate.set()
    part = _owned(runtime, tmp_path, producer)
    consumer = Consumer()
    runtime.consumer = cast(Any, consumer)
    return producer, changelog, part, consumer


def _failures(runtime: BatchedRuntime) -> list[BaseException]:
    """What the runtime would crash with, collected instead."""
    failed: list[BaseException] = []
    runtime.crash = lambda exc: failed.append(exc) or asyncio.sleep(0)  # type: ignore[method-assign]
    return failed


async def _two_in_flight_one_waiting(runtime: BatchedRuntime, tmp_path: Path,
                                     *entities: bytes) -> tuple[Producer, Consumer, str]:
    """at_least_once: batches 1, 2, 3 of the partition for `entities` (values b"1", b"2", b"3"), the first's
    changelog held: the first and second in flight, the third waiting. Returns the producer, the consumer and the
    held changelog topic."""
    producer, changelog, part, consumer = _changelog_held(runtime, tmp_path)
    first, second, third = entities
    await _batch(runtime, part, first, b"1", 1)
    await _batch(runtime, part, second, b"2", 2)
    await asyncio.sleep(0.02)  # the second in flight beside the first's changelog
    await _batch(runtime, part, third, b"3", 3)  # waits
    return producer, consumer, changelog


async def test_a_revoke_waits_for_both_batches_in_flight_and_the_one_waiting(runtime: BatchedRuntime,
                                                                             tmp_path: Path) -> None:
    """at_least_once, two batches of a partition in flight and one waiting: a revoke returns only once all three
    are delivered, stored and their offsets committed; then the partition's database is closed."""
    producer, consumer, changelog = await _two_in_flight_one_waiting(runtime, tmp_path, b"a", b"a", b"a")
    assert KEY in runtime.waiting and len([e for e in producer.log if e[:2] == ("sent", "out")]) == 2
    revoking = asyncio.ensure_future(runtime.revoked({TP0}))
    await asyncio.sleep(0.02)
    assert not revoking.done() and KEY in runtime.parts
    producer.held[changelog].set()
    await asyncio.wait_for(revoking, 1)
    assert KEY not in runtime.parts and KEY not in runtime.waiting and TP0 not in runtime.positions
    assert consumer.committed[-1] == {TP0: 3} and runtime._committing is None
    reopened = PartitionState(tmp_path / "tables", runtime.routes["r"], 0, {})
    try:
        assert reopened.dbs[ENTITIES].get(b"a") == b"3" and reopened.input_offsets() == {"in": 3}
    finally:
        reopened.close()


async def test_a_stop_lands_both_batches_in_flight_and_commits_before_the_consumer_stops(
        runtime: BatchedRuntime, tmp_path: Path) -> None:
    """SIGTERM with two batches of a partition in flight and one waiting: the stop stores all three and commits
    their offsets before the consumer leaves the group, then closes the databases."""
    producer, consumer, changelog = await _two_in_flight_one_waiting(runtime, tmp_path, b"a", b"b", b"c")
    stopping = asyncio.ensure_future(runtime.on_stop())
    await asyncio.sleep(0.02)
    assert not stopping.done() and not hasattr(consumer, "stopped")
    producer.held[changelog].set()
    await asyncio.wait_for(stopping, 1)
    assert consumer.stopped[-1] == {TP0: 3} and not runtime.parts and producer.log[-1] == ("stop",)
    reopened = PartitionState(tmp_path / "tables", runtime.routes["r"], 0, {})
    try:
        assert [reopened.dbs[ENTITIES].get(k) for k in (b"a", b"b", b"c")] == [b"1", b"2", b"3"]
        assert reopened.input_offsets() == {"in": 3}
    finally:
        reopened.close()


async def test_a_failed_partition_does_not_cut_short_the_landing_of_the_others(runtime: BatchedRuntime,
                                                                              tmp_path: Path) -> None:
    """A revoke and a stop wait for every batch in flight before the partitions go and their databases close,
    also where a batch of another partition failed: its error is raised once the others landed. (Else the stop
    closed the database under a batch whose changelog was on its way, its store failed, and its changelog could
    reach the topic after the partition was handed over.)"""
    producer = Producer()
    producer.refused.add("out[0]")
    changelog = runtime.changelogs["r"][ENTITIES]
    producer.held[f"{changelog}[1]"] = asyncio.Event()
    failed: list[BaseException] = []
    runtime.crash = lambda exc: failed.append(exc) or asyncio.sleep(0)  # type: ignore[method-assign]
    part0 = _owned(runtime, tmp_path, producer)
    part1 = _owned(runtime, tmp_path, producer, ("r", 1))
    consumer = Consumer()
    runtime.consumer = cast(Any, consumer)
    await _batch(runtime, part0, b"a", b"1", 1)
    await _batch(runtime, part1, b"b", b"2", 1, key=("r", 1))
    producer.gate.set()
    await asyncio.sleep(0.02)  # r[0]'s outputs refused; r[1]'s delivered, its changelog on its way
    assert runtime._failed and ("delivered", "out", "b") in producer.log
    landing = asyncio.ensure_future(runtime._landed_all())
    await asyncio.sleep(0.02)
    assert not landing.done()
    producer.held[f"{changelog}[1]"].set()
    with pytest.raises(KafkaError):
        await asyncio.wait_for(landing, 1)
    await runtime._committed()
    assert part1.dbs[ENTITIES].get(b"b") == b"2" and part1.input_offsets() == {"in": 1}
    assert part0.dbs[ENTITIES].get(b"a") is None and part0.input_offsets() == {}
    assert consumer.committed == [{TP1: 1}] and len(failed) == 1


async def test_a_batch_whose_outputs_failed_is_done_only_once_the_batch_before_it_landed(runtime: BatchedRuntime,
                                                                                         tmp_path: Path) -> None:
    """at_least_once, two batches in flight: where the newer one's outputs are not delivered while the older one's
    changelog is on its way, the older one still lands (stored, committed) before a revoke or a stop goes on:
    they wait for the newest batch of a partition only, so it is done only once the one before it is."""
    producer, changelog, part, consumer = _changelog_held(runtime, tmp_path)
    failed = _failures(runtime)
    await _batch(runtime, part, b"a", b"1", 1)
    await asyncio.sleep(0.02)  # its outputs delivered, its changelog on its way
    producer.refused.add("out")
    await _batch(runtime, part, b"b", b"2", 2)  # in flight at once, its outputs refused
    await asyncio.sleep(0.02)
    assert runtime._failed and len(failed) == 1  # the worker stops at once
    landing = asyncio.ensure_future(runtime._landed_all())
    await asyncio.sleep(0.02)
    assert not landing.done()
    producer.held[changelog].set()
    with pytest.raises(KafkaError):
        await asyncio.wait_for(landing, 1)
    await runtime._committed()
    assert part.dbs[ENTITIES].get(b"a") == b"1" and part.dbs[ENTITIES].get(b"b") is None
    assert part.input_offsets() == {"in": 1} and consumer.committed == [{TP0: 1}]
    assert runtime._failed and len(failed) == 1


class Jittery(Producer):
    """Delivers each batch sent after a few turns of the loop, as `rng` says; `changes` has the changelog records
    delivered, in order: (topic, key, value)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.changes: list[tuple[str, bytes | None, bytes | None]] = []

    def create_batch(self) -> Builder:
        builder = Builder()
        values: list[bytes | None] = []
        append = builder.append

        def keep(*, timestamp: Any, key: bytes | None, value: bytes | None, headers: Any) -> bool:
            values.append(value)
            return append(timestamp=timestamp, key=key, value=value, headers=headers)

        builder.append = keep  # type: ignore[method-assign]
        builder.values = values  # type: ignore[attr-defined]
        return builder

    async def send_batch(self, batch: Builder, topic: str, partition: int) -> asyncio.Future[Any]:
        keys = ",".join(k.decode() for k in batch.keys if k is not None)
        self.log.append(("sent", topic, keys))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        turns = self.rng.randint(0, 6)

        async def land() -> None:
            for _ in range(turns):
                await asyncio.sleep(0)
            self.log.append(("delivered", topic, keys))
            if topic != "out":
                self.changes.extend((topic, k, v) for k, v in zip(batch.keys, batch.values, strict=True))  # type: ignore[attr-defined]
            fut.set_result(SimpleNamespace(offset=self.next[(topic, partition)]))
            self.next[(topic, partition)] += batch.record_count()

        self._landing = asyncio.ensure_future(land())
        return fut


@pytest.mark.parametrize("seed", range(12))
async def test_stacked_batches_read_store_and_log_what_a_model_of_their_writes_says(tmp_path: Path,
                                                                                     seed: int) -> None:
    """at_least_once with overlap, deliveries landing in random turns: batches that write the same few keys of
    two tables again and again (the same bytes as the batch before, a value back to an earlier one, deletions)
    read, at every point, the newest value written, by key and in a scan (pruning the in-flight overlay by value
    equality is sound); at most two batches of the partition are in flight at once; every store follows the
    delivery of its batch's outputs; and in the end RocksDB, the changelogs' last word per key and the committed
    offset are the model's."""
    rng = random.Random(seed)
    runtime = _runtime(tmp_path, "at_least_once")
    producer = Jittery(rng)
    part = _owned(runtime, tmp_path, producer)
    consumer = Consumer()
    runtime.consumer = cast(Any, consumer)
    fly = runtime._fly
    active, peak = [0], [0]

    async def counted(*args: Any) -> None:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            await fly(*args)
        finally:
            active[0] -= 1

    runtime._fly = counted  # type: ignore[method-assign]
    store = part.store

    def checked(changelog_offsets: Any, inputs: Any, *, sealed: Any = False) -> None:
        last = f"o{inputs['in'] - 1}"  # the output of the batch's last record, delivered before it is stored
        assert any(e[:2] == ("delivered", "out") and last in e[2].split(",") for e in producer.log), last
        store(changelog_offsets, inputs, sealed=sealed)

    part.store = checked  # type: ignore[method-assign]
    keys, values = (b"a", b"b", b"c"), (b"1", b"2", None)
    model: dict[str, dict[bytes, bytes | None]] = {ENTITIES: {}, LAMPORTS: {}}
    for offset in range(1, 61):
        out = runtime._batches(KEY)
        for name in (ENTITIES, LAMPORTS):
            for key in rng.sample(keys, rng.randint(0, 2)):
                value = rng.choice(values)
                if value is None:
                    part.readers[name].delete(key)
                else:
                    part.readers[name].put(key, value)
                model[name][key] = value
        out.add("out", 0, f"o{offset - 1}".encode(), b"")
        records = 10 if rng.random() < 0.1 else 1
        await asyncio.wait_for(runtime._finish(KEY, runtime.routes["r"], part, out, {TP0: offset}, records), 2)
        for name, written in model.items():
            assert {k: part.readers[name].get(k) for k in written} == written, (offset, name)
        for _ in range(rng.randint(0, 8)):
            await asyncio.sleep(0)
        for name, written in model.items():
            assert {k: part.readers[name].get(k) for k in written} == written, (offset, name)
            assert dict(part.readers[name].items()) == {k: v for k, v in written.items() if v is not None}
    await runtime._landed_all()
    await runtime._committed()
    assert peak[0] == 2 and not any(part.flight.values())
    for name, written in model.items():
        assert {k: part.dbs[name].get(k) for k in written} == written
        logged: dict[bytes | None, bytes | None] = {}
        for topic, key, value in producer.changes:
            if topic == runtime.changelogs["r"][name]:
                logged[key] = value
        assert logged == written
    assert part.input_offsets() == {"in": 60} and consumer.committed[-1] == {TP0: 60}


async def test_a_step_raises_the_error_of_one_partition_once_the_others_finished_theirs(
        runtime: BatchedRuntime) -> None:
    """A step's partitions run side by side; where one fails, its error is raised once the others have finished
    their part of the step (their batches in flight or waiting): a stop that follows waits for all of them, and
    none goes in flight behind its back, after the databases were closed."""
    runtime.consumer = cast(Any, Consumer())
    finished: list[Key] = []

    async def partition(key: Key, items: Any) -> None:
        if key == KEY:
            raise KafkaError("r[0] failed")
        await asyncio.sleep(0.02)  # r[1] is still processing its records
        finished.append(key)

    runtime._partition = partition  # type: ignore[method-assign]
    with pytest.raises(KafkaError):
        await runtime._step({TP0: [Msg(0, 0)], TP1: [Msg(0, 0)]})  # type: ignore[dict-item]
    assert finished == [("r", 1)]
