"""The batched runtime's per-record metrics, counted in plain dicts and added to prometheus once per batch.

prometheus_client takes a lock and walks a histogram's buckets in Python on every `inc` and `observe`: three
of them per event (byzguard_events_total, byzguard_data_age_seconds, byzguard_verify_duration_seconds) cost
about as much as a tenth of `Guard.process`. A `Tally` counts the same things per label set and bucket, and
`flush` adds them, in one `inc` per series, when the loop finishes the batch's processing (before its outputs
are delivered, as the per-record calls were). What each metric counts is unchanged (docs/operations.md).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from app import metrics
from byzguard.guard import Routed
from byzguard.verdict import Code, Outcome


class HistogramTally:
    """Observations of one histogram series, bucketed as prometheus_client's `Histogram.observe` does (the
    first bucket whose upper bound is >= the value), added to the series by `flush`."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)  # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.total += amount
        if amount == amount:  # NaN falls in no bucket (Histogram.observe's `amount <= bound` is never true)
            self.counts[bisect_left(self.bounds, amount)] += 1

    def flush(self) -> None:
        counts = self.counts
        if not self.total and not any(counts):
            return
        child = self.child
        child._sum.inc(self.total)
        buckets = child._buckets
        for i, count in enumerate(counts):
            if count:
                buckets[i].inc(count)
                counts[i] = 0
        self.total = 0.0


class Tally:
    """The metrics of the records the loop routed since the last `flush`."""

    def __init__(self, routes: Iterable[str] = ()) -> None:
        #: Per (route, type label): the count of each outcome (the enum member: its `.value`, a property, is
        #: read once per series in `flush`, not once per event).
        self.events: dict[tuple[str, str], dict[Outcome, int]] = {}
        self.failures: dict[tuple[str, str, str, str, str], int] = {}
        self.regressions: dict[tuple[str, str], int] = {}
        self.ages: dict[tuple[str, str], HistogramTally] = {}
        #: Each route's byzguard_verify_duration_seconds series exists (at 0) from the start.
        self.latencies = {route: HistogramTally(metrics.VERIFY_SECONDS.labels(route)) for route in routes}

    def latency(self, route: str, seconds: float) -> None:
        """One event's byzguard_verify_duration_seconds."""
        hist = self.latencies.get(route)
        if hist is None:
            hist = self.latencies[route] = HistogramTally(metrics.VERIFY_SECONDS.labels(route))
        hist.observe(seconds)

    def routed(self, route: str, routed: Routed, now: float) -> None:
        """Count one routed record: its outcome, failed checks and data age."""
        decision = routed.decision
        outcome = decision.outcome
        env = routed.envelope
        series = (route, metrics.type_label(route, env.type) if env is not None else metrics.UNKNOWN)
        outcomes = self.events.get(series)
        if outcomes is None:
            outcomes = self.events[series] = {}
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if decision.reasons:
            source = metrics.source_label(env.source) if env is not None else metrics.UNKNOWN
            for reason in decision.reasons:
                key = (route, reason.check, reason.code.value, reason.severity.value, source)
                self.failures[key] = self.failures.get(key, 0) + 1
                if reason.code is Code.VERSION_REGRESSION:
                    self.regressions[series] = self.regressions.get(series, 0) + 1
        if env is not None and env.time is not None and outcome is not Outcome.DUPLICATE:
            age = self.ages.get(series)
            if age is None:
                age = self.ages[series] = HistogramTally(metrics.DATA_AGE.labels(*series))
            age.observe(max(0.0, now - env.time))

    def flush(self) -> None:
        """Add what was counted to the metrics."""
        if self.events:
            for (route, event_type), outcomes in self.events.items():
                for outcome, count in outcomes.items():
                    metrics.EVENTS.labels(route, event_type, outcome.value).inc(count)
            self.events.clear()
        if self.failures:
            for check, count in self.failures.items():
                metrics.CHECK_FAILURES.labels(*check).inc(count)
            self.failures.clear()
        if self.regressions:
            for series, count in self.regressions.items():
                metrics.VERSION_REGRESSIONS.labels(*series).inc(count)
            self.regressions.clear()
        for hist in self.latencies.values():
            hist.flush()
        for hist in self.ages.values():
            hist.flush()
