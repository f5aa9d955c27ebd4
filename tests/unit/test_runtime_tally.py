"""The batched runtime's per-batch metrics (app/runtime/tally.py) count what the per-record calls counted."""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from app import metrics
from app.runtime.tally import HistogramTally, Tally
from byzguard.engine import Decision
from byzguard.envelope import Envelope
from byzguard.guard import RecordIn, Routed
from byzguard.verdict import Code, Outcome, Reason


def _samples(registry: CollectorRegistry, label: str) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value for m in registry.collect() for s in m.samples
            if s.labels.get("series") == label and not s.name.endswith("_created")}


_EVENTS: dict[tuple[str, str, str], Any] = {}
_DATA_AGE: dict[tuple[str, str], Any] = {}


def observe_per_event(route: str, routed: Routed, now: float) -> None:
    """The per-event prometheus calls a Tally stands for: the reference it is held to."""
    decision = routed.decision
    env = routed.envelope
    event_type = metrics.type_label(route, env.type) if env is not None else metrics.UNKNOWN
    labels = (route, event_type, decision.outcome.value)
    events = _EVENTS.get(labels)
    if events is None:
        events = _EVENTS[labels] = metrics.EVENTS.labels(*labels)
    events.inc()
    if decision.reasons:
        source = metrics.source_label(env.source) if env is not None else metrics.UNKNOWN
        for reason in decision.reasons:
            metrics.CHECK_FAILURES.labels(route, reason.check, reason.code.value, reason.severity.value,
                                          source).inc()
            if reason.code is Code.VERSION_REGRESSION:
                metrics.VERSION_REGRESSIONS.labels(route, event_type).inc()
    if env is not None and env.time is not None and decision.outcome is not Outcome.DUPLICATE:
        age = _DATA_AGE.get((route, event_type))
        if age is None:
            age = _DATA_AGE[(route, event_type)] = metrics.DATA_AGE.labels(route, event_type)
        age.observe(max(0.0, now - env.time))


def test_a_histogram_tally_buckets_and_sums_as_observe_does() -> None:
    """Values on, below, between and above the bounds land in the buckets Histogram.observe puts them in."""
    registry = CollectorRegistry()
    hist = Histogram("t_seconds", "t", ["series"], buckets=(1e-5, 1e-4, 1e-3, 1.0), registry=registry)
    values = [0.0, 1e-6, 1e-5, 1.00001e-5, 5e-5, 1e-4, 1e-3, 0.5, 1.0, 2.0, 1e9, math.inf, -1.0]
    for value in values:
        hist.labels("each").observe(value)
    tally = HistogramTally(hist.labels("tally"))
    for value in values:
        tally.observe(value)
    assert _samples(registry, "tally")[("t_seconds_count", "")] == 0  # nothing before the flush
    tally.flush()
    tally.flush()  # a second flush adds nothing
    assert _samples(registry, "tally") == _samples(registry, "each")


def test_a_histogram_tally_puts_nan_in_no_bucket() -> None:
    """NaN counts in no bucket, as Histogram.observe leaves it out of every `le`."""
    registry = CollectorRegistry()
    hist = Histogram("n_seconds", "n", ["series"], buckets=(1.0,), registry=registry)
    tally = HistogramTally(hist.labels("tally"))
    tally.observe(math.nan)
    tally.observe(0.5)
    tally.flush()
    samples = _samples(registry, "tally")
    assert samples[("n_seconds_bucket", "1.0")] == 1
    assert samples[("n_seconds_bucket", "+Inf")] == 1


def _series(route: str) -> dict[tuple[str, tuple[str, ...]], float]:
    """Every sample of the per-record metrics whose route label is `route`, the route label left out."""
    found = {}
    for metric in (metrics.EVENTS, metrics.CHECK_FAILURES, metrics.VERSION_REGRESSIONS, metrics.DATA_AGE,
                   metrics.VERIFY_SECONDS):
        for family in metric.collect():
            for s in family.samples:
                if s.labels.get("route") == route and not s.name.endswith("_created"):
                    labels = tuple(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "route")
                    found[(s.name, labels)] = s.value
    return found


def _routed() -> list[Routed]:
    record = RecordIn(b"s1", b"{}", [], "prices", 0, 1)
    env = Envelope(id="e1", source="intruder", type="weird.type", subject="s1", mode="binary", covered=b"{}",
                   time=90.0)
    quarantined = Decision(Outcome.QUARANTINED, (Reason(Code.SOURCE_NOT_ALLOWED, "no"),
                                                  Reason(Code.VERSION_REGRESSION, "older")))
    return [Routed(record, Decision(Outcome.VERIFIED, ()), env, [], None),
            Routed(record, Decision(Outcome.VERIFIED, ()), env, [], None),
            Routed(record, quarantined, env, None, []),
            Routed(record, Decision(Outcome.DUPLICATE, ()), env, None, None),
            Routed(record, Decision(Outcome.QUARANTINED, (Reason(Code.DECODE_MALFORMED, "x"),)), None, None, [])]


def test_a_tally_counts_what_observe_counts_once_flushed() -> None:
    """Outcomes, failed checks, version regressions, data ages and verify durations of a batch, once flushed,
    are the series per-event prometheus calls give the same records."""
    tally = Tally(["tally-b"])
    for routed in _routed():
        observe_per_event("tally-a", routed, 100.0)
        tally.routed("tally-b", routed, 100.0)
    for seconds in (2e-5, 3e-4, 0.1):
        metrics.VERIFY_SECONDS.labels("tally-a").observe(seconds)
        tally.latency("tally-b", seconds)
    before = _series("tally-b")
    assert not any(v for (name, _), v in before.items()), before  # the series exist at 0 until the flush
    tally.flush()
    tally.flush()
    assert _series("tally-b") == _series("tally-a")
    assert _series("tally-b")[("byzguard_events_total", ("outcome=verified", "type=other"))] == 2


def test_the_runtime_batches_fit_the_review_stores_fetches() -> None:
    """A record batch of the runtime's outputs is never larger than what the review store fetches per partition
    (a broker returns a larger batch whole, past the store's memory bound)."""
    from app.review.store import SCAN_FETCH_BYTES
    from app.runtime.loop import BATCH_BYTES

    assert 16384 < BATCH_BYTES <= SCAN_FETCH_BYTES
