"""Variant (a): the ceiling of this stack. A plain aiokafka consume-then-produce loop, no framework.

It uses the consumer and producer settings the faust worker gets from `app.worker.faust_options` (fetch
wait, fetch size, acks, linger, batch size, commit interval), keeps each record's partition, key, value
and headers, and commits offsets (at least once) only after the records sent for them are acknowledged.

    python -m bench.passthrough_raw --broker HOST:PORT --input T --output T --group G
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata


def faust_batching(bootstrap: str) -> dict[str, Any]:
    """The client settings faust derives from byzguard's faust_options (so both variants batch alike)."""
    import faust

    from app.settings import Settings
    from app.worker import faust_options

    conf = faust.App("bench-settings-probe", **faust_options(Settings(), bootstrap)).conf
    return {
        "fetch_max_wait_ms": 1500,  # hard-coded by faust's aiokafka driver
        "max_partition_fetch_bytes": conf.consumer_max_fetch_size,
        "max_poll_records": conf.broker_max_poll_records,
        "acks": "all" if conf.producer_acks == -1 else conf.producer_acks,
        "linger_ms": int(conf.producer_linger * 1000),
        "max_batch_size": conf.producer_max_batch_size,
        "max_request_size": conf.producer_max_request_size,
        "commit_interval": conf.broker_commit_interval,
    }


async def start_clients(bootstrap: str, topics: list[str], group: str, batching: dict[str, Any], *,
                        max_poll_records: int | None, isolation_level: str = "read_uncommitted",
                        ) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
    """A started consumer of `topics` in `group` (manual commits) and producer, batching as `batching` says."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=batching["fetch_max_wait_ms"],
                                max_partition_fetch_bytes=batching["max_partition_fetch_bytes"],
                                max_poll_records=max_poll_records, isolation_level=isolation_level)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=batching["acks"], linger_ms=batching["linger_ms"],
                                max_batch_size=batching["max_batch_size"],
                                max_request_size=batching["max_request_size"])
    await producer.start()
    await consumer.start()
    return consumer, producer


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    return stop


async def commit_acknowledged(consumer: AIOKafkaConsumer, pending: list[asyncio.Future[Any]],
                              offsets: dict[TopicPartition, int]) -> None:
    """Wait until every record sent is acknowledged, then commit `offsets` (at least once); clear both."""
    await asyncio.gather(*pending)
    pending.clear()
    if offsets:
        await consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
        offsets.clear()


async def stop_clients(consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
    """Stop both clients, whatever state they are in."""
    with contextlib.suppress(Exception):
        await consumer.stop()
    with contextlib.suppress(Exception):
        await producer.stop()


async def passthrough(bootstrap: str, source: str, target: str, group: str, batching: dict[str, Any]) -> None:
    """Forward every record of `source` to the same partition of `target` until SIGTERM."""
    consumer, producer = await start_clients(bootstrap, [source], group, batching,
                                             max_poll_records=batching["max_poll_records"])
    stop = stop_on_signals()
    pending: list[asyncio.Future[Any]] = []
    offsets: dict[TopicPartition, int] = {}
    last_commit = time.monotonic()
    send = producer.send
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            for tp, messages in batch.items():
                partition = tp.partition
                for msg in messages:
                    pending.append(await send(target, msg.value, key=msg.key, partition=partition,
                                              headers=list(msg.headers)))
                offsets[tp] = messages[-1].offset + 1
            if offsets and time.monotonic() - last_commit >= batching["commit_interval"]:
                await commit_acknowledged(consumer, pending, offsets)
                last_commit = time.monotonic()
        await commit_acknowledged(consumer, pending, offsets)
    finally:
        await stop_clients(consumer, producer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    args = parser.parse_args()
    batching = faust_batching(args.broker)
    print(f"raw pass-through {args.input} -> {args.output}, group {args.group}, batching {batching}", flush=True)
    # The stock asyncio loop, as `byzguard run` uses (faust's worker does not switch to uvloop by itself).
    asyncio.run(passthrough(args.broker, args.input, args.output, args.group, batching))


if __name__ == "__main__":
    main()
