"""`python -m bench.gctrace MODULE ARGS...`: run MODULE as __main__ and print every garbage collection of the
oldest generation, and every collection that took 5 ms or more, with its wall-clock time and duration.

For the diagnostic variant `c_gctrace` (bench/variants.py): whether c's latency spikes under a paced load line up
with the collector's pauses (the worker freezes its long-lived objects after each rebalance, app/worker.py).
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Any

from bench.wrapper import run_as_main

#: Collections at least this long are printed whatever their generation (seconds).
SLOW = 0.005


def trace() -> None:
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        generation = info.get("generation")
        if (generation == 2 or took >= SLOW) and not sys.stdout.closed:  # the last collections run at exit
            print(f"bench.gctrace: {time.time():.3f} generation {generation} took {took * 1000:.1f} ms, "
                  f"collected {info.get('collected')}, counts now {gc.get_count()}", flush=True)

    gc.callbacks.append(callback)


def main() -> None:
    module, *args = sys.argv[1:]
    trace()
    run_as_main(module, args)


if __name__ == "__main__":
    main()
