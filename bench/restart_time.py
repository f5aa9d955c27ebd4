"""SIGKILL to the next routed record: how long a worker's partitions stall when it is killed and restarted at once
on the same data dir (the batched runtime; the test harness's workers and events).

One worker routes a steady trickle of clean events (one every `--interval` seconds, over 8 entities). Each
round SIGKILLs it, restarts it on the same data dir and measures, at a downstream read_committed consumer of
the verified topic, the seconds from the kill to the first verified record produced after the kill, and the
CPU seconds the new process had used by then (what the restart costs apart from waiting for a loaded machine's
cores). Prints each round and the median, per guarantee.

Every restart keeps the worker's web port (so its URL), as a restarted worker keeps its configuration. `--wipe`
deletes the data dir before each restart (the state comes back from the changelogs): the restarted worker then
recognises its predecessor by its address and URL; `--worker-id NAME` runs it as BYZGUARD_WORKER_ID=NAME, which
recognises it by name as well.

    python -m bench.restart_time --broker 127.0.0.1:9092 --rounds 5 --guarantee exactly_once,at_least_once
    python -m bench.restart_time --rounds 5 --wipe --worker-id guard-0
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.kafka import delete_topics
from bench.procs import cpu_seconds, loadavg
from byzguard.client.producer import GuardedProducer
from tests.integration.worker_harness import Events, WorkerFactory, WorkerProcess, wipe


async def _trickle(bootstrap: str, topic: str, interval: float, stop: asyncio.Event, sent: dict[str, float]) -> None:
    """Send one clean event every `interval` seconds; remember when each was sent."""
    events = Events()
    version = 0
    async with GuardedProducer(bootstrap, source="bench-restart") as producer:
        while not stop.is_set():
            version += 1
            for n in range(8):
                record = events.clean(f"e{n}", version)
                sent[record.event_id] = time.time()
                await producer.send_stamped(topic, record)
                await asyncio.sleep(interval)


async def _first_after(consumer: AIOKafkaConsumer, sent: dict[str, float], after: float, timeout: float) -> float:
    """Wall-clock time at which the first verified record of an event sent after `after` arrives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fetched = await consumer.getmany(timeout_ms=50)
        for records in fetched.values():
            for r in records:
                event_id = next((v.decode() for k, v in r.headers if k == "ce_id"), "")
                if sent.get(event_id, 0.0) > after:
                    return time.time()
    raise TimeoutError(f"no record routed within {timeout:.0f} s of the kill")


def _named(worker: WorkerProcess, worker_id: str | None, port: int | None) -> WorkerProcess:
    """`worker` as BYZGUARD_WORKER_ID=`worker_id` (if given) on web port `port` (if given: its predecessor's)."""
    if worker_id is not None:
        worker.env["BYZGUARD_WORKER_ID"] = worker_id
    if port is not None:
        worker.env["BYZGUARD_WEB_PORT"] = str(port)
        worker.web_port = port
    return worker


async def measure(bootstrap: str, guarantee: str, rounds: int, interval: float, base: Path, *,
                  wipe_dir: bool = False, worker_id: str | None = None) -> list[float]:
    factory = WorkerFactory(bootstrap, base, f"restart-{guarantee.replace('_', '-')}",
                            processing_guarantee=guarantee)
    route = factory.configure(partitions=4)
    stop = asyncio.Event()
    sent: dict[str, float] = {}
    trickle: asyncio.Task[None] | None = None
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, isolation_level="read_committed",
                                auto_offset_reset="latest")
    times: list[float] = []
    try:  # whatever fails (a worker not ready, the consumer, an interrupt), every worker started here is killed
        worker = _named(factory.new_worker("w"), worker_id, None).start()
        worker.wait_ready(120)
        port = worker.web_port  # a restarted worker keeps its configured web port, so its URL
        data_dir = worker.data_dir
        trickle = asyncio.create_task(_trickle(bootstrap, route.input, interval, stop, sent))
        await consumer.start()
        tps = [TopicPartition(route.verified, p) for p in range(route.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        await _first_after(consumer, sent, 0.0, 60)  # it routes
        for n in range(rounds):
            await asyncio.sleep(2.0)
            worker.kill()
            killed = time.time()
            if wipe_dir:
                wipe(data_dir)
            worker = _named(factory.new_worker(f"w{n}", data_dir=data_dir), worker_id, port).start()
            arrived = await _first_after(consumer, sent, killed, 90)
            cpu = cpu_seconds(worker.pid)
            times.append(arrived - killed)
            print(f"{guarantee} round {n + 1}: {times[-1]:.2f} s from SIGKILL to the next routed record "
                  f"(the new process's CPU time by then: {cpu or 0:.2f} s; load average {loadavg()[0]:.1f})",
                  flush=True)
            worker.wait_ready(60)
    finally:
        try:
            stop.set()
            if trickle is not None:
                await trickle
            await consumer.stop()
        finally:
            factory.cleanup()
            # Its topics (the route's and the worker's own): claimed for a pytest session only, so deleted here.
            try:
                await asyncio.wait_for(delete_topics(bootstrap, [route.input.removesuffix("-in"),
                                                                 f"{factory.app_id}-"]), 60)
            except Exception as exc:
                print(f"WARNING: could not delete the run's topics: {exc!r}", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="127.0.0.1:9092")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between two events sent")
    parser.add_argument("--guarantee", default="exactly_once,at_least_once")
    parser.add_argument("--keep", type=Path, help="keep the workers' data dirs and logs here")
    parser.add_argument("--wipe", action="store_true", help="delete the data dir before each restart")
    parser.add_argument("--worker-id", help="run the worker as BYZGUARD_WORKER_ID=this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        if args.keep:
            tmp = str(args.keep)
        for guarantee in args.guarantee.split(","):
            (Path(tmp) / guarantee).mkdir(parents=True)
            times = asyncio.run(measure(args.broker, guarantee, args.rounds, args.interval, Path(tmp) / guarantee,
                                        wipe_dir=args.wipe, worker_id=args.worker_id))
            print(f"{guarantee}: median {statistics.median(times):.2f} s, min {min(times):.2f}, "
                  f"max {max(times):.2f} over {len(times)} SIGKILLs", flush=True)


if __name__ == "__main__":
    main()
