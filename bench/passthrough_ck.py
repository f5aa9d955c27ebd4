"""Variant (a_ck): the physical ceiling of a Python Kafka client here. A confluent-kafka consume-produce pass-through.

A bench-only dependency (the `bench` extra), never imported by the product. Same contract as variant (a):
every record goes to the same partition of the output with its key, value and headers, and offsets are
committed (at least once) only after every record produced for them is acknowledged by the broker. The
producer batches like (a) (acks, linger, batch size); the consumer reads what librdkafka holds, up to 1000
records at a time (`take`: `poll` for the first, then `consume(999, timeout=0)`). A plain `consume(1000, timeout)`
returns only once it has 1000 records or the timeout passed: at 9,000 ev/s a record waited ~110 ms in it before
2026-12-08 (bench/results/clat-*).

librdkafka's `fetch.queue.backoff.ms` (default 1000 ms) makes a consumer with a small prefetch cap sit idle
for a second whenever its local queue is full; it is set to 5 ms here, as measured on this machine.

    python -m bench.passthrough_ck --broker HOST:PORT --input T --output T --group G
"""

from __future__ import annotations

import argparse
import signal
import time
from typing import Any

from bench.passthrough_raw import faust_batching


def client_configs(bootstrap: str, group: str, batching: dict[str, Any], *, librdkafka_batching: bool = False,
                   in_flight: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(consumer, producer) librdkafka settings matching (a)'s aiokafka clients; `librdkafka_batching`: the
    producer keeps librdkafka's own linger (5 ms) and batch size (1 MB) instead of (a)'s; `in_flight`: its produce
    requests in flight per broker (librdkafka's default 1,000,000; aiokafka's sender has one)."""
    consumer = {
        "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
        "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": batching["fetch_max_wait_ms"],
        "max.partition.fetch.bytes": batching["max_partition_fetch_bytes"],
        "fetch.queue.backoff.ms": 5,  # the trap: the 1000 ms default idles the consumer (see the module doc)
    }
    producer = {
        "bootstrap.servers": bootstrap, "acks": "all" if batching["acks"] in ("all", -1) else batching["acks"],
        "linger.ms": batching["linger_ms"], "batch.size": batching["max_batch_size"],
        "message.max.bytes": max(batching["max_request_size"], 1_000_000),
        "enable.idempotence": False,  # as aiokafka's default producer in (a)
    }
    if librdkafka_batching:
        del producer["linger.ms"], producer["batch.size"]
    if in_flight is not None:
        producer["max.in.flight.requests.per.connection"] = in_flight
    return consumer, producer


def take(consumer: Any, most: int, timeout: float) -> list[Any]:
    """Up to `most` records librdkafka holds, without waiting for more once it has one: the first by `poll`
    (waiting at most `timeout` s), then whatever else is already there (`consume` with no wait). `consume(most,
    timeout)` alone waits for `most` records or the whole timeout."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(num_messages=most - 1, timeout=0)] if most > 1 else [first]


def passthrough(bootstrap: str, source: str, target: str, group: str, batching: dict[str, Any], *,
                librdkafka_batching: bool = False, in_flight: int | None = None) -> None:
    """Forward every record of `source` to the same partition of `target` until SIGTERM."""
    from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

    consumer_conf, producer_conf = client_configs(bootstrap, group, batching, librdkafka_batching=librdkafka_batching,
                                                  in_flight=in_flight)
    consumer = Consumer(consumer_conf)
    producer = Producer(producer_conf)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    failed: list[Any] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(err)

    consumer.subscribe([source])
    offsets: dict[int, int] = {}
    last_commit = time.monotonic()
    produce = producer.produce
    try:
        while not stopping:
            for msg in take(consumer, 1000, 0.2):
                if msg.error():
                    raise KafkaException(msg.error())
                while True:
                    try:
                        produce(target, msg.value(), msg.key(), msg.partition(), on_delivery=delivered,
                                headers=msg.headers())
                        break
                    except BufferError:
                        producer.poll(0.05)
                offsets[msg.partition()] = msg.offset() + 1
            producer.poll(0)
            if offsets and time.monotonic() - last_commit >= batching["commit_interval"]:
                _commit(consumer, producer, source, offsets, failed, TopicPartition)
                last_commit = time.monotonic()
        _commit(consumer, producer, source, offsets, failed, TopicPartition)
    finally:
        producer.flush(30)
        consumer.close()


def _commit(consumer: Any, producer: Any, source: str, offsets: dict[int, int], failed: list[Any],
            tp: Any) -> None:
    """Wait for every produced record's acknowledgement, then commit `offsets` synchronously (at least once)."""
    if producer.flush(60) != 0:
        raise RuntimeError("records still undelivered after 60 s")
    if failed:
        raise RuntimeError(f"delivery failed: {failed[0]}")
    if offsets:
        consumer.commit(offsets=[tp(source, p, o) for p, o in offsets.items()], asynchronous=False)
        offsets.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--in-flight", type=int, default=None,
                        help="produce requests in flight per broker (default librdkafka's; a's aiokafka sender: 1)")
    parser.add_argument("--librdkafka-batching", action="store_true",
                        help="the producer keeps librdkafka's linger (5 ms) and batch size (1 MB)")
    args = parser.parse_args()
    batching = faust_batching(args.broker)
    print(f"confluent-kafka pass-through {args.input} -> {args.output}, group {args.group}, batching {batching}"
          f"{', librdkafka batching' if args.librdkafka_batching else ''}", flush=True)
    passthrough(args.broker, args.input, args.output, args.group, batching,
                librdkafka_batching=args.librdkafka_batching, in_flight=args.in_flight)


if __name__ == "__main__":
    main()
