"""bench.core's run_case under callgrind: every timing runs its loop once between two os.getppid() calls.

Run with `valgrind --tool=callgrind --dump-before=getppid`: dumps 2, 4, ..., 18 each hold one loop over the
N events (decode, integrity, state decode, checks, rules, state build, encode, headers, Guard.process).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from bench import core


def marked(fn: Callable[[], object], reps: int, count: int) -> float:
    fn()  # warm up, as _timed does
    os.getppid()
    fn()
    os.getppid()
    return 0.0


if __name__ == "__main__":
    core._timed = marked  # type: ignore[assignment]
    core.run_case(core.CASES[sys.argv[1]], int(sys.argv[2]), 1, "rocksdb")
