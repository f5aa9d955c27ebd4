"""Variant (f): a BENCH PROTOTYPE, not the product. Shape (2) of docs/runtime-choice.md: a faust agent fed one event
per fetch instead of one per record.

faust's public API has no way to make its own consumer deliver a whole fetch as one event: its conductor hands
every record to the topic's channel one by one (`Conductor.on_message`), and `stream.take_events` batches only
after that per-record delivery (b_take in bench/results/). What the public API does allow is an agent on an
in-memory channel (`app.channel()`) fed by a task that consumes itself; that is what this is. The task reads
whole fetches with its own aiokafka consumer (`getmany`, group = app id) and sends each fetch as one event
(`channel.send(value=fetch)`); the agent runs the same batch code as variant (e) (bench/batch_guard.py: the
guard, RocksDB state after delivery, aiokafka record batches, commit after the state) on each event.
So the consumer, its group membership and its commits are the loop's own, as in shape (1): what faust adds is
its worker, its agent, stream and channel per fetch. Producer: the record batches go through the aiokafka
producer of faust's own producer (`app.producer._ensure_producer()`, a private name).

    BYZGUARD_BROKER=HOST:PORT BYZGUARD_APP_ID=G BYZGUARD_CONFIG=... python -m bench.faust_batches --data-dir D
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import faust
from faust.worker import Worker
from mode.supervisors import CrashingSupervisor

from app.settings import Settings
from app.worker import faust_options
from bench.batch_guard import AloBatches, Loop
from bench.passthrough_raw import start_clients, stop_clients


def build(settings: Settings, data_dir: Path, config: Path, max_records: int) -> faust.App:
    assert settings.broker, "BYZGUARD_BROKER must be set"
    # faust's own consumer group must not be the loop's (it would join it with no topics and steal partitions).
    app = faust.App(settings.app_id + "-faust", **faust_options(settings, settings.broker))
    loop = Loop(settings.broker, settings.app_id, data_dir, config, eos=False, max_records=max_records, max_ms=100)
    fetches = app.channel()
    clients: dict[str, Any] = {}

    async def verify_fetches(stream: faust.StreamT[Any]) -> None:
        batches: AloBatches | None = None
        async for fetched in stream:
            if batches is None:
                batches = AloBatches(loop, clients["consumer"], app.producer._ensure_producer())  # type: ignore[attr-defined]
            await batches.step(fetched)
            if not fetched:
                await batches.finish()

    app.agent(fetches, name="verify_fetches", supervisor_strategy=CrashingSupervisor)(verify_fetches)

    @app.task
    async def consume() -> None:
        consumer, producer = await start_clients(loop.bootstrap, list(loop.route.inputs), loop.app_id, loop.batching,
                                                 max_poll_records=None)
        await producer.stop()  # only the consumer is used: outputs go through faust's producer
        clients["consumer"] = consumer
        try:
            while True:
                fetched = await consumer.getmany(timeout_ms=200, max_records=loop.max_records)
                # An empty fetch too: the agent then settles the batch in flight (commits when input stops).
                await fetches.send(value=fetched)
        finally:
            await stop_clients(consumer, producer)
            for part in loop.partitions.values():
                part.close()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--max-records", type=int, default=1000)
    args = parser.parse_args()
    settings = Settings()
    app = build(settings, args.data_dir, args.config, args.max_records)
    print(f"BENCH PROTOTYPE faust agent fed one event per fetch, app {settings.app_id}", flush=True)
    Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    main()
