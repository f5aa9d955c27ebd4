"""Variant (e), a prototype and not the product: byzguard's own core in a batched aiokafka loop, no faust.

It answers one question of the benchmark: how fast is this stack with byzguard's checks when the per-event
framework machinery is taken away? Each fetched batch of a partition is verified in a tight loop with
`Guard.process` (the same call the faust agent makes, same config, same RocksDB state layout), its outputs
and changelog records are sent back to back (so the producer batches them), its state writes go to RocksDB
in one WriteBatch, and the input offsets are committed (at least once) after all of that is acknowledged.
Not done here: metrics, receipts, causal-deadline ticks, table recovery from changelogs, exactly_once.

    BYZGUARD_CONFIG=... python -m bench.batch_guard --broker HOST:PORT --app-id G --data-dir D
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from rocksdict import Options, Rdict, WriteBatch

from bench.passthrough_raw import commit_acknowledged, faust_batching, start_clients, stop_clients, stop_on_signals
from byzguard.config import load
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, Guard, RecordIn

# The faust table each of the guard's state names lives in (tables/__init__.py), for changelog topic names.
TABLE_OF = {ENTITIES: "state_by_entity", LAMPORTS: "lamport_by_source", CAUSAL: "causal_by_entity"}


class PartitionState:
    """One partition's RocksDB databases, read through the writes of the batch in progress."""

    def __init__(self, root: Path, partition: int) -> None:
        self.dbs: dict[str, Rdict] = {}
        self.root = root
        self.partition = partition
        self.pending: dict[str, dict[bytes, bytes | None]] = {name: {} for name in TABLE_OF}

    def db(self, name: str) -> Rdict:
        if name not in self.dbs:
            path = self.root / f"{TABLE_OF[name]}-{self.partition}.db"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.dbs[name] = Rdict(str(path), Options(raw_mode=True))
        return self.dbs[name]

    def reader(self, name: str) -> Any:
        pending = self.pending[name]
        state = self

        class Reader:
            def get(self, key: bytes) -> bytes | None:
                if key in pending:
                    return pending[key]
                value: bytes | None = state.db(name).get(key)
                return value

        return Reader()

    def flush(self) -> None:
        """Write the batch's state in one WriteBatch per table."""
        for name, writes in self.pending.items():
            if not writes:
                continue
            batch = WriteBatch(raw_mode=True)
            for key, value in writes.items():
                if value is None:
                    batch.delete(key)
                else:
                    batch.put(key, value)
            self.db(name).write(batch)
            writes.clear()


async def run(bootstrap: str, app_id: str, data_dir: Path, config_path: Path) -> None:
    config = load(config_path)
    route = config.routes[0]
    guard = Guard(config)
    batching = faust_batching(bootstrap)
    # No max_poll_records: a batch is whatever one fetch returned (as measured in the committed results).
    consumer, producer = await start_clients(bootstrap, list(route.inputs), app_id, batching, max_poll_records=None)
    stop = stop_on_signals()
    partitions: dict[int, PartitionState] = {}
    pending: list[asyncio.Future[Any]] = []
    offsets: dict[TopicPartition, int] = {}
    last_commit = time.monotonic()
    changelog = {name: f"{app_id}-{route.name}-{table}-changelog" for name, table in TABLE_OF.items()}
    send = producer.send
    try:
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=200)
            for tp, messages in fetched.items():
                part = partitions.get(tp.partition) or partitions.setdefault(
                    tp.partition, PartitionState(data_dir, tp.partition))
                state = {name: part.reader(name) for name in TABLE_OF}
                for msg in messages:
                    result = guard.process(RecordIn(msg.key, msg.value, msg.headers or (), msg.topic, msg.partition,
                                                    msg.offset, msg.timestamp), route, state, now=time.time())
                    for (name, key), value in result.writes.items():
                        part.pending[name][key] = value
                    for routed in result.routed:
                        rec = routed.record
                        if routed.verified_headers is not None:
                            pending.append(await send(route.verified_topic, rec.value, key=rec.key,
                                                      partition=rec.partition, headers=routed.verified_headers))
                        if routed.quarantine_headers is not None:
                            pending.append(await send(route.quarantine_topic, rec.value, key=rec.key,
                                                      partition=rec.partition, headers=routed.quarantine_headers))
                # One changelog record per key the batch changed (not one per write), then one RocksDB write.
                for name, writes in part.pending.items():
                    for key, value in writes.items():
                        pending.append(await send(changelog[name], value, key=key, partition=tp.partition))
                part.flush()
                offsets[tp] = messages[-1].offset + 1
            if offsets and time.monotonic() - last_commit >= batching["commit_interval"]:
                await commit_acknowledged(consumer, pending, offsets)
                last_commit = time.monotonic()
        await commit_acknowledged(consumer, pending, offsets)
    finally:
        await stop_clients(consumer, producer)
        for part in partitions.values():
            for db in part.dbs.values():
                db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()
    print(f"batched guard loop, app {args.app_id}, config {args.config}", flush=True)
    asyncio.run(run(args.broker, args.app_id, args.data_dir, args.config))


if __name__ == "__main__":
    main()
