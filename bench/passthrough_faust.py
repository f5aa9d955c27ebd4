"""Variant (b): the framework's ceiling. A faust agent that forwards every record and does nothing else.

The App gets byzguard's own `faust_options` (from the same BYZGUARD_* settings: processing guarantee,
commit interval, store, ...), raw serializers, and sends with an explicit partition (no key hashing), so the
only difference from byzguard is the verification work and the table reads and writes.

    BYZGUARD_BROKER=HOST:PORT BYZGUARD_APP_ID=G python -m bench.passthrough_faust --input T --output T
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import faust
from faust.worker import Worker
from mode.supervisors import CrashingSupervisor

from app.settings import Settings
from app.worker import faust_options
from bench.fetching import tune_fetch

RAW: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}


def build(settings: Settings, source: str, target: str, *, take: int = 0, yield_each: bool = False) -> faust.App:
    """A faust App with one pass-through agent from `source` to `target` (`take`: in batches of up to that many;
    `yield_each`: as an async generator that yields after each event, as faust's examples write agents)."""
    assert settings.broker, "BYZGUARD_BROKER must be set"
    options = faust_options(settings, settings.broker)
    # Experiments only (never set by `make bench`): JSON overrides of faust settings, e.g. {"producer_linger": 0.005}.
    options.update(json.loads(os.environ.get("BENCH_FAUST_OVERRIDES", "{}")))
    app = faust.App(settings.app_id, **options)
    tune_fetch(app, min_bytes=settings.fetch_min_bytes, max_wait_ms=settings.fetch_max_wait_ms)  # as byzguard's
    source_topic = app.topic(source, **RAW)
    target_topic = app.topic(target, **RAW)

    # A plain coroutine, not an async generator: faust then skips its per-yield bookkeeping (a debug log call,
    # the reply-to lookup and the sinks, Agent._slurp), as byzguard's agent does.
    async def forward_events(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            await target_topic.send(key=msg.key, value=msg.value, partition=msg.partition, headers=msg.headers)

    async def forward_batches(stream: faust.StreamT[bytes]) -> None:
        # Diagnostic: sends of a whole batch are issued back to back, so the producer can batch them.
        async for batch in stream.take_events(take, within=0.05):
            for event in batch:
                msg = event.message
                await target_topic.send(key=msg.key, value=msg.value, partition=msg.partition, headers=msg.headers)

    async def forward_yielding(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        # Diagnostic: the same agent written as an async generator (faust's per-yield bookkeeping included).
        async for event in stream.events():
            msg = event.message
            await target_topic.send(key=msg.key, value=msg.value, partition=msg.partition, headers=msg.headers)
            yield None

    agent: Any = forward_batches if take else forward_yielding if yield_each else forward_events
    app.agent(source_topic, name="forward_events", supervisor_strategy=CrashingSupervisor)(agent)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--take", type=int, default=0, help="diagnostic: forward in batches of up to N events")
    parser.add_argument("--yield-each", action="store_true", help="diagnostic: the agent as an async generator")
    args = parser.parse_args()
    settings = Settings()
    app = build(settings, args.input, args.output, take=args.take, yield_each=args.yield_each)
    print(f"faust pass-through {args.input} -> {args.output}, app {settings.app_id}, "
          f"{settings.processing_guarantee}", flush=True)
    Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    main()
