"""What the placement check costs: murmur2 per key, and Guard.process with and without it.

Run with `python bench/placement_speed.py` from the repository root. It prints µs per call (CPU time, the
fastest of several timeit repeats): byzguard's murmur2 against aiokafka's reference for an entity id, the
cached partition lookup, the whole check over 10,000 entities, and Guard.process on a stream of clean
events (bench/events.py, 10,000 entities, every check on) read from the partition of their key, once
without a partition count (no placement check) and once with it.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from bench import events
from bench.rules_speed import per_call_us
from byzguard.config import load
from byzguard.guard import Guard, RecordIn
from byzguard.partitioner import misplaced, murmur2, partition_for

NOW = 1_750_000_000.0
PARTITIONS = 8


def main() -> None:
    """Print the table of µs per call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per timing (default 0.3)")
    parser.add_argument("--repeat", type=int, default=5, help="timings per figure, the fastest kept (default 5)")
    parser.add_argument("--events", type=int, default=20_000, help="events in the stream (default 20000)")
    args = parser.parse_args()
    clock = time.process_time

    key = b"sku-0000042"
    print(f"µs per call (CPU time), fastest of {args.repeat} timings")

    def show(label: str, call: Callable[[], object]) -> None:
        print(f"{label:40} {per_call_us(call, args.budget, args.repeat, clock):8.2f}")

    show("murmur2, aiokafka (reference)", lambda: aiokafka_murmur2(key))
    show("murmur2, byzguard.partitioner", lambda: murmur2(key))
    show("partition_for (cached key)", lambda: partition_for(key, PARTITIONS))

    keys = [(f"sku-{i:07d}".encode(), f"sku-{i:07d}") for i in range(10_000)]
    placed = itertools.cycle([(k, s, partition_for(k, PARTITIONS)) for k, s in keys])

    def check() -> object:
        k, s, p = next(placed)
        return misplaced(k, s, p, PARTITIONS)

    show("the placement check, 10,000 entities", check)

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        config = load(events.write_config(Path(tmp) / "bench.yaml", repo=Path(__file__).resolve().parent.parent,
                                          input_topic="in", verified="v", quarantine="q", partitions=PARTITIONS),
                      environ=events.secret_env())
    guard, route = Guard(config), config.routes[0]
    stream = list(events.records(events.events(args.events, 10_000, at=NOW), seq=False))
    for label, counted in (("Guard.process, no placement check", None),
                           ("Guard.process, placement checked", PARTITIONS)):
        records = [RecordIn(k, v, h, "in", partition_for(k, PARTITIONS), i, NOW, counted)
                   for i, (k, v, h) in enumerate(stream)]
        cycle = itertools.cycle(records)
        state: dict[str, dict[bytes, bytes]] = {"entities": {}, "lamports": {}, "causal": {}}

        def one(cycle: itertools.cycle[RecordIn] = cycle, state: dict[str, dict[bytes, bytes]] = state) -> object:
            # Fresh state each time (writes are not applied): every event is judged as its entity's first.
            return guard.process(next(cycle), route, state, now=NOW)

        show(label, one)


if __name__ == "__main__":
    main()
