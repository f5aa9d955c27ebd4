"""Variants (e) and (e_eos): a BENCH PROTOTYPE, not the product. Byzguard's core in a batched aiokafka loop, no faust.

This is shape (1) of docs/runtime-choice.md (the loop beside faust's agents, on aiokafka's consumer), built just
far enough to measure it honestly. Per input partition, a batch is the records of one fetch, bounded in records
(`--max-records`) and in processing time (`--max-ms`, default 100 ms). For each batch:

1. every record goes through `Guard.process` (the call the faust agent makes: same config, same RocksDB state
   layout), reading its state through the batch's pending writes, then the writes of the batch in flight, then
   RocksDB;
2. its outputs and one changelog record per changed key go into aiokafka record batches (`create_batch` /
   `send_batch`, as app/runtime/batches.py builds them), not a future per record;
3. at_least_once (e): once the broker acknowledged every output of the batch, its state is written to RocksDB
   (one WriteBatch per table) and then its offsets are committed. The loop goes on with the next fetch while the
   previous one is acknowledged (one batch in flight), so a redelivered record is never judged a duplicate of
   its own stored state — except in the window between the state write and the offset commit (the product
   must store the offsets in the same WriteBatch; see docs/runtime-choice.md);
   exactly_once (e_eos): one transactional producer per input partition (`<app>-<topic>-<partition>`), one
   transaction per partition per batch holding its outputs, its changelog records and its input offsets
   (`send_offsets_to_transaction`); the state goes to RocksDB once the transaction committed. Partitions commit
   concurrently; the next batch of a partition waits for the previous one.

Not done here (the product runtime must): rebalance handling (revoke/assign, closing and restoring state from
the changelog), metrics, receipts, causal-deadline punctuations, audits, offsets stored with the state.

    BYZGUARD_CONFIG=... python -m bench.batch_guard --broker HOST:PORT --app-id G --data-dir D [--eos]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from rocksdict import Options, Rdict

from app.runtime.batches import RecordBatches as ProductBatches
from app.runtime.state import write_batch_of
from bench.passthrough_raw import commit_acknowledged, faust_batching, start_clients, stop_clients, stop_on_signals
from byzguard.config import load
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, Guard, RecordIn

# The faust table each of the guard's state names lives in (tables/__init__.py), for changelog topic names.
TABLE_OF = {ENTITIES: "state_by_entity", LAMPORTS: "lamport_by_source", CAUSAL: "causal_by_entity"}

Writes = dict[str, dict[bytes, bytes | None]]


def _empty() -> Writes:
    return {name: {} for name in TABLE_OF}


class PartitionState:
    """One partition's RocksDB databases, read through the writes of the batch in progress and of the batch in
    flight (sent, not yet acknowledged or committed)."""

    def __init__(self, root: Path, partition: int) -> None:
        self.dbs: dict[str, Rdict] = {}
        self.root = root
        self.partition = partition
        self.pending: Writes = _empty()
        self.in_flight: Writes = _empty()
        self.readers = {name: _Reader(self, name) for name in TABLE_OF}

    def db(self, name: str) -> Rdict:
        if name not in self.dbs:
            path = self.root / f"{TABLE_OF[name]}-{self.partition}.db"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.dbs[name] = Rdict(str(path), Options(raw_mode=True))
        return self.dbs[name]

    def seal(self) -> Writes:
        """The batch in progress becomes the batch in flight (the previous one must have been stored)."""
        assert not any(self.in_flight.values()), "a partition has at most one batch in flight"
        self.in_flight, self.pending = self.pending, _empty()
        return self.in_flight

    def store(self) -> None:
        """Write the batch in flight to RocksDB, one WriteBatch per table (only after its outputs are delivered)."""
        for name, writes in self.in_flight.items():
            if not writes:
                continue
            self.db(name).write(write_batch_of(writes))
            writes.clear()

    def close(self) -> None:
        for db in self.dbs.values():
            db.close()


class _Reader:
    __slots__ = ("name", "part")

    def __init__(self, part: PartitionState, name: str) -> None:
        self.part = part
        self.name = name

    def get(self, key: bytes) -> bytes | None:
        part, name = self.part, self.name
        pending = part.pending[name]
        if key in pending:
            return pending[key]
        in_flight = part.in_flight[name]
        if key in in_flight:
            return in_flight[key]
        value: bytes | None = part.db(name).get(key)
        return value


class RecordBatches(ProductBatches):
    """The product's record batches (app/runtime/batches.py), counting records and handing back the futures for
    the prototype's own commit order."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        super().__init__(producer)
        self.records = 0

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
            headers: Sequence[tuple[str, bytes]] = ()) -> None:
        super().add(topic, partition, key, value, headers)
        self.records += 1

    async def send(self) -> list[asyncio.Future[Any]]:
        """Hand every batch to the producer; the futures resolve when the broker acknowledged them."""
        batches = [*self.full, *((t, p, b) for (t, p), b in self.open.items())]
        self.full, self.open, self.records = [], {}, 0
        return [await self.producer.send_batch(b, t, partition=p) for t, p, b in batches]


def chunks(messages: Sequence[Any], max_records: int, max_seconds: float,
           clock: Callable[[], float] = time.monotonic) -> Any:
    """Yield the messages, and None whenever a batch ends: after `max_records` records, once `max_seconds` have
    passed since the batch's first record (the caller processes each record before asking for the next), and
    after the last message; a batch holds at least one record."""
    start = clock()
    count = 0
    for msg in messages:
        if count and (count >= max_records or clock() - start >= max_seconds):
            yield None
            start, count = clock(), 0
        yield msg
        count += 1
    if count:
        yield None


class AloBatches:
    """at_least_once over fetches handed in one at a time (by the loop itself, or by a faust agent in shape 2):
    fetch N is processed and sent while fetch N-1 is acknowledged, stored and committed."""

    def __init__(self, loop: Loop, consumer: Any, producer: AIOKafkaProducer, *, commit_behind: bool = False) -> None:
        self.loop = loop
        self.consumer = consumer
        self.out = RecordBatches(producer)
        #: diagnostic (--commit-behind): the offset commit runs as a task, at most one in flight, instead of
        #: inside the loop; the state is still written before it
        self.commit_behind = commit_behind
        self.committing: asyncio.Task[None] | None = None
        self.in_flight: tuple[list[asyncio.Future[Any]], list[PartitionState], dict[TopicPartition, int]] | None = None

    async def step(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        loop, out = self.loop, self.out
        sealed: list[PartitionState] = []
        offsets: dict[TopicPartition, int] = {}
        for tp, messages in fetched.items():
            part = loop.part(tp)
            for msg in messages:
                loop.process(part, msg, out)
            loop.changelog_records(part, out)
            offsets[tp] = messages[-1].offset + 1
            sealed.append(part)
        futures = await out.send() if offsets else []
        await self.finish(wait_commit=not self.commit_behind)
        if offsets:
            for part in sealed:
                part.seal()
            self.in_flight = (futures, sealed, offsets)

    async def finish(self, *, wait_commit: bool = True) -> None:
        """The batch in flight: outputs acknowledged, then its state written, then its offsets committed (without
        `wait_commit`, the commit may still be running when this returns)."""
        if self.in_flight is not None:
            futures, parts, offsets = self.in_flight
            self.in_flight = None
            await asyncio.gather(*futures)
            for part in parts:
                part.store()
            if self.committing is not None:
                await self.committing  # commits stay in order, at most one in flight
            self.committing = asyncio.ensure_future(commit_acknowledged(self.consumer, [], offsets))
        if wait_commit and self.committing is not None:
            committing, self.committing = self.committing, None
            await committing


class Loop:
    """The prototype's loop: one consumer, the guard, per-partition state, batches, commits or transactions."""

    def __init__(self, bootstrap: str, app_id: str, data_dir: Path, config_path: Path, *, eos: bool,
                 max_records: int, max_ms: float, commit_behind: bool = False) -> None:
        self.commit_behind = commit_behind
        self.bootstrap = bootstrap
        self.app_id = app_id
        self.data_dir = data_dir
        self.config = load(config_path)
        self.route = self.config.routes[0]
        self.guard = Guard(self.config)
        self.eos = eos
        self.max_records = max_records
        self.max_seconds = max_ms / 1000
        self.batching = faust_batching(bootstrap)
        self.partitions: dict[int, PartitionState] = {}
        self.changelog = {name: f"{app_id}-{self.route.name}-{table}-changelog" for name, table in TABLE_OF.items()}
        #: exactly_once: the transactional producer of each input partition, and its batch's commit task
        self.txn_producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self.txn_tasks: dict[TopicPartition, asyncio.Task[None]] = {}

    def part(self, tp: TopicPartition) -> PartitionState:
        found = self.partitions.get(tp.partition)
        if found is None:
            found = self.partitions[tp.partition] = PartitionState(self.data_dir, tp.partition)
        return found

    def process(self, part: PartitionState, msg: Any, out: RecordBatches) -> None:
        """One record through the guard; its writes go to the batch's pending state, its outputs to `out`."""
        route = self.route
        result = self.guard.process(RecordIn(msg.key, msg.value, msg.headers or (), msg.topic, msg.partition,
                                             msg.offset, msg.timestamp), route, part.readers, now=time.time())
        pending = part.pending
        for (name, key), value in result.writes.items():
            pending[name][key] = value
        for routed in result.routed:
            rec = routed.record
            if routed.verified_headers is not None:
                out.add(route.verified_topic, rec.partition, rec.key, rec.value, routed.verified_headers)
            if routed.quarantine_headers is not None:
                out.add(route.quarantine_topic, rec.partition, rec.key, rec.value, routed.quarantine_headers)

    def changelog_records(self, part: PartitionState, out: RecordBatches) -> None:
        """One changelog record per key the batch changed (not one per write)."""
        for name, writes in part.pending.items():
            topic = self.changelog[name]
            for key, value in writes.items():
                out.add(topic, part.partition, key, value)

    async def run(self) -> None:
        consumer, producer = await start_clients(self.bootstrap, list(self.route.inputs), self.app_id, self.batching,
                                                 max_poll_records=None, isolation_level="read_committed"
                                                 if self.eos else "read_uncommitted")
        stop = stop_on_signals()
        try:
            if self.eos:
                await self._run_eos(consumer, stop)
            else:
                await self._run_alo(consumer, producer, stop)
        finally:
            for task in self.txn_tasks.values():
                task.cancel()
            for txn in self.txn_producers.values():
                await txn.stop()
            await stop_clients(consumer, producer)
            for part in self.partitions.values():
                part.close()

    async def _run_alo(self, consumer: Any, producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
        """at_least_once: one batch (all partitions of one fetch) in flight while the next is processed."""
        batches = AloBatches(self, consumer, producer, commit_behind=self.commit_behind)
        while not stop.is_set():
            await batches.step(await consumer.getmany(timeout_ms=200, max_records=self.max_records))
        await batches.finish()

    async def _run_eos(self, consumer: Any, stop: asyncio.Event) -> None:
        """exactly_once: one transaction per partition per batch, batches bounded in records and time."""
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
            for tp, messages in fetched.items():
                part = self.part(tp)
                txn = await self._txn_producer(tp)
                out = RecordBatches(txn)
                batch_last = None
                for msg in chunks(messages, self.max_records, self.max_seconds):
                    if msg is not None:
                        if batch_last is None:
                            await self._settled(tp)  # this partition's previous transaction is done
                        self.process(part, msg, out)
                        batch_last = msg
                        continue
                    assert batch_last is not None
                    self.changelog_records(part, out)
                    part.seal()
                    txn_task = self._commit_batch(txn, out, part, {tp: batch_last.offset + 1})
                    self.txn_tasks[tp] = asyncio.ensure_future(txn_task)
                    out = RecordBatches(txn)
                    batch_last = None
        for tp in list(self.txn_tasks):
            await self._settled(tp)

    async def _settled(self, tp: TopicPartition) -> None:
        task = self.txn_tasks.pop(tp, None)
        if task is not None:
            await task

    async def _txn_producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        txn = self.txn_producers.get(tp)
        if txn is None:
            b = self.batching
            txn = AIOKafkaProducer(bootstrap_servers=self.bootstrap, transactional_id=f"{self.app_id}-{tp.topic}-"
                                   f"{tp.partition}", acks="all", enable_idempotence=True, linger_ms=b["linger_ms"],
                                   max_batch_size=b["max_batch_size"], max_request_size=b["max_request_size"])
            await txn.start()
            self.txn_producers[tp] = txn
        return txn

    async def _commit_batch(self, txn: AIOKafkaProducer, out: RecordBatches, part: PartitionState,
                            offsets: dict[TopicPartition, int]) -> None:
        """One transaction: outputs, changelog records and input offsets; then the state goes to RocksDB."""
        await txn.begin_transaction()
        try:
            futures = await out.send()
            await txn.send_offsets_to_transaction(offsets, self.app_id)
            await txn.commit_transaction()
        except BaseException:
            await txn.abort_transaction()
            raise
        await asyncio.gather(*futures)
        part.store()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--eos", action="store_true", help="exactly_once: a transaction per partition per batch")
    parser.add_argument("--max-records", type=int, default=1000, help="records per batch at most (default 1000)")
    parser.add_argument("--max-ms", type=float, default=100.0,
                        help="exactly_once: processing time of a batch at most, in ms (default 100)")
    parser.add_argument("--commit-behind", action="store_true",
                        help="at_least_once diagnostic: commit offsets in a task (one in flight), not in the loop")
    args = parser.parse_args()
    print(f"BENCH PROTOTYPE batched guard loop ({'exactly_once' if args.eos else 'at_least_once'}), app "
          f"{args.app_id}, config {args.config}, batches <= {args.max_records} records / {args.max_ms:g} ms",
          flush=True)
    loop = Loop(args.broker, args.app_id, args.data_dir, args.config, eos=args.eos, max_records=args.max_records,
                max_ms=args.max_ms, commit_behind=args.commit_behind)
    asyncio.run(loop.run())


if __name__ == "__main__":
    main()
