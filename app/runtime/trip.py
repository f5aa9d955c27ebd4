"""Diagnostic (BZG_TRIP_LOG=1): where a record's trip through the batched runtime goes, logged every 5 s.

Per step: the input records' age (their timestamp to now) when fetched, and the time from fetch to processed,
outputs delivered, changelog delivered, stored and committed. Off by default: no cost then."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

ENABLED = os.environ.get("BZG_TRIP_LOG", "") == "1"


class Trip:
    def __init__(self) -> None:
        self.rows: list[tuple[float, ...]] = []
        self.due = time.monotonic() + 5

    def step(self, records: int, age_first: float, age_last: float, marks: dict[str, float], t0: float) -> None:
        self.rows.append((records, age_first, age_last,
                          *(marks.get(k, t0) - t0 for k in ("processed", "delivered", "changelog", "stored")),
                          time.time() - t0))
        if time.monotonic() >= self.due:
            self.due = time.monotonic() + 5
            rows, self.rows = self.rows, []
            n = len(rows)
            total = sum(r[0] for r in rows)
            def avg(i: int) -> float:
                return sum(r[i] * r[0] for r in rows) / max(1, total) * 1000
            def mx(i: int) -> float:
                return max(r[i] for r in rows) * 1000
            log.info("trip: %d steps, %d records (%.0f/step); ms weighted avg/max: age at fetch first %.1f/%.1f "
                     "last %.1f/%.1f; +processed %.1f/%.1f +delivered %.1f/%.1f +changelog %.1f/%.1f "
                     "+stored %.1f/%.1f +committed %.1f/%.1f", n, total, total / max(1, n),
                     avg(1), mx(1), avg(2), mx(2), avg(3), mx(3), avg(4), mx(4), avg(5), mx(5), avg(6), mx(6),
                     avg(7), mx(7))
