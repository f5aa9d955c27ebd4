"""`python -m bench.skipping AFTER COUNT MODULE ARGS...`: run MODULE as __main__, with COUNT records of each input
partition held back from the verify agent once, after the first AFTER records the agent saw of that partition.

For the diagnostic variant `cf_norules_skip` (bench/variants.py; the faust agent runtime): it forces the in-order
guard's seek-back (app/eos.py, `InOrder.in_order`), which otherwise happens in about a third of the memory phase's
runs, when faust abandons records at the end of table recovery. In two such runs at 400,000 entities the worker's
RSS jumped by 90-120 MB at the seek-back (bench/results/profile.md, "Memory phase"); this measures it on purpose.

A held-back record is dropped as the guard drops a record it will fetch again (`InOrder.drop`: not acked, not
processed); the next record then shows the gap, and the guard seeks back to the first held-back one.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tracemalloc
from typing import Any

from app import eos
from bench.wrapper import run_as_main


def hold_back(after: int, count: int) -> None:
    """Patch `eos.process` (the verify agent calls it by module attribute) to hold records back once."""
    process = eos.process
    seen: dict[Any, int] = {}  # per partition: records the agent was handed before the window
    window: dict[Any, tuple[int, int]] = {}  # per partition: [first, end) offsets held back
    done: set[Any] = set()

    async def held_back(app: Any, event: Any, handle: Any) -> None:
        message = event.message
        tp, offset = message.tp, message.offset
        order = eos.order_of(app)
        if tp not in done and order is not None and tp.topic in order.guarded_topics:
            if tp not in window:
                seen[tp] = seen.get(tp, 0) + 1
                if seen[tp] > after:
                    window[tp] = (offset, offset + count)
            first, end = window.get(tp, (-1, -1))
            if first <= offset < end:
                order.drop(app.consumer, message)
                return
            if offset >= end > 0:
                done.add(tp)
                print(f"bench.skipping: {tp} held back {first}..{end - 1}; record {offset} shows the gap",
                      flush=True)
                if len(done) == 1 and TRACE_AFTER > 0:
                    asyncio.get_running_loop().call_later(TRACE_AFTER, _print_top)
        await process(app, event, handle)

    eos.process = held_back  # type: ignore[assignment]


#: With BENCH_TRACEMALLOC=SECONDS: that long after the first seek-back the largest allocations still alive are
#: printed (the worker log then says where the memory of the seek-back went).
TRACE_AFTER = float(os.environ.get("BENCH_TRACEMALLOC", "0") or 0)


def _print_top() -> None:
    snapshot = tracemalloc.take_snapshot()
    total = sum(stat.size for stat in snapshot.statistics("filename"))
    print(f"bench.skipping: {total / 1e6:.1f} MB traced {TRACE_AFTER:g} s after the seek-back; largest by line:",
          flush=True)
    for stat in snapshot.statistics("traceback")[:12]:
        print(f"  {stat.size / 1e6:.1f} MB in {stat.count} blocks", flush=True)
        for line in stat.traceback.format(limit=8, most_recent_first=True):
            print(f"    {line}", flush=True)


def main() -> None:
    after, count, module, *args = sys.argv[1:]
    if TRACE_AFTER > 0:
        tracemalloc.start(16)
    hold_back(int(after), int(count))
    run_as_main(module, args)


if __name__ == "__main__":
    main()
