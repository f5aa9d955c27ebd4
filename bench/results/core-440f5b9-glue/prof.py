"""Guard.process in a loop, set up as bench/core.py's run_case sets it up (fresh: 1 id, steady: 32 ids).

`python prof.py CASE N` prints a cProfile of one pass over N events; `python prof.py CASE N cgK` runs K
passes and no profiler (run it under callgrind with K=0 and K=2: the difference / 2N is Ir per call).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import core
from bench import events as bench_events
from byzguard.guard import Guard, RecordIn


def setup(ids: int, entities: int) -> tuple[Guard, Any, Any, list[RecordIn]]:
    """The guard, route, RocksDB state and the events to time, each entity remembering `ids` ids."""
    tmp = Path(tempfile.mkdtemp(prefix="glue-"))
    config = core._config(tmp)
    route = config.routes[0]
    guard = Guard(config)
    tables = core._Tables("rocksdb", tmp)
    state = tables.tables
    stamped = list(bench_events.events((ids + 1) * entities, entities, at=core.AT))
    records = [RecordIn(s.key, s.value, s.headers, "in", 0, i, core.AT) for i, s in enumerate(stamped)]
    for r in records[: ids * entities]:
        tables.apply(guard.process(r, route, state, now=core.NOW).writes)
    return guard, route, state, records[ids * entities:]


def main() -> None:
    case = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    guard, route, state, todo = setup(core.CASES[case], n)

    def total() -> None:
        for r in todo:
            guard.process(r, route, state, now=core.NOW)
    total()
    if len(sys.argv) > 3 and sys.argv[3].startswith("cg"):
        for _ in range(int(sys.argv[3][2:])):
            total()
        return
    profile = cProfile.Profile()
    profile.enable()
    total()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(45)


if __name__ == "__main__":
    main()
