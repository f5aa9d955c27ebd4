"""Prometheus metrics of a worker. Labels are bounded: never an entity id or event id."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from byzguard.config import GuardConfig

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_start_time_seconds & co.: restarts show on the dashboard

EVENTS = Counter("byzguard_events_total", "Input records by route, event type and outcome",
                 ["route", "type", "outcome"], registry=REGISTRY)
CHECK_FAILURES = Counter("byzguard_check_failures_total", "Failed checks by check, code, severity and source",
                         ["route", "check", "code", "severity", "source"], registry=REGISTRY)
VERSION_REGRESSIONS = Counter("byzguard_version_regressions_total", "Events older than the verified version",
                              ["route", "type"], registry=REGISTRY)
VERIFY_SECONDS = Histogram("byzguard_verify_duration_seconds", "Time to decode and verify one event",
                           ["route"], buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 2.5e-2),
                           registry=REGISTRY)
DATA_AGE = Histogram("byzguard_data_age_seconds", "Age of event time at verification (freshness)",
                     ["route", "type"],
                     buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400),
                     registry=REGISTRY)
CAUSAL_HELD = Gauge("byzguard_causal_buffer_events", "Events held for missing causal dependencies",
                    ["route"], registry=REGISTRY)
CAUSAL_OLDEST = Gauge("byzguard_causal_buffer_oldest_age_seconds", "Age of the oldest held event",
                      ["route"], registry=REGISTRY)
QUARANTINE_BACKLOG = Gauge("byzguard_quarantine_backlog_records",
                           "Quarantined records by review status (pending, approved, rejected, replayed)",
                           ["route", "status"], registry=REGISTRY)
AUDIT_CHECKS = Counter("byzguard_audit_checks_total", "Items checked by a cross-stream audit rule",
                       ["rule"], registry=REGISTRY)
AUDIT_DISCREPANCIES = Counter("byzguard_audit_discrepancies_total", "Discrepancies found by a cross-stream audit rule",
                              ["rule", "kind"], registry=REGISTRY)
AUDIT_AGREEMENT = Gauge("byzguard_audit_agreement_ratio",
                        "Share of an audit rule's checks in the last hour on which the services agree (0..1), "
                        "on this worker", ["rule"], registry=REGISTRY)
AUDIT_WATERMARK_LAG = Gauge("byzguard_audit_watermark_lag_seconds",
                            "How far the oldest audit watermark of a rule's join partitions on this worker is behind "
                            "the wall clock (windows close by it)", ["rule"], registry=REGISTRY)
LAST_GOOD_SERVED = Counter("byzguard_last_good_served_total",
                           "Last-known-good values served in place of suspect or missing data",
                           ["route", "type"], registry=REGISTRY)
LAST_GOOD_REQUESTS = Counter("byzguard_last_good_requests_total",
                             "Last-known-good lookups answered by the owning worker, by outcome "
                             "(fresh, fallback, not_found, expired)", ["route", "outcome"], registry=REGISTRY)
CONSUMER_LAG = Gauge("byzguard_consumer_lag_messages",
                     "Records of an assigned input partition not yet committed by this worker (high water - position)",
                     ["topic", "partition"], registry=REGISTRY)
TYPE_MAX_AGE = Gauge("byzguard_type_max_age_seconds", "Configured max age of an event type (time.stale beyond it)",
                     ["route", "type"], registry=REGISTRY)

# ---------------------------------------------------------------------------------------------- label bounds
# Label values that come from events (type, source) are kept to those the configuration names; anything else
# is counted as "other", so a misbehaving producer cannot create unbounded series.

OTHER = "other"
UNKNOWN = "unknown"  # the record could not be decoded: no type or source to speak of
LAG_INTERVAL = 5.0


@dataclass(frozen=True)
class LabelBounds:
    """The event types (per route) and sources the configuration knows."""

    types: Mapping[str, frozenset[str]]
    sources: frozenset[str]

    @classmethod
    def of(cls, config: GuardConfig) -> LabelBounds:
        types: dict[str, frozenset[str]] = {}
        sources: set[str] = set()
        for route in config.routes:
            types[route.name] = frozenset(t for t in (*route.types, route.default_type) if t)
            for policy in (*route.types.values(), route.fallback):
                sources.update(policy.sources or ())
                for key_id in policy.key_ids or ():
                    key = config.keyring.get(key_id)
                    if key is not None:
                        sources.add(key.source)
        return cls(types, frozenset(sources))


_bounds = LabelBounds({}, frozenset())


def configure(config: GuardConfig) -> None:
    """Bound the event-derived labels to `config`'s types and sources; publish each type's max age."""
    global _bounds
    _bounds = LabelBounds.of(config)
    for route in config.routes:
        for name, policy in (*route.types.items(), (OTHER, route.fallback)):
            if policy.max_age is not None:
                TYPE_MAX_AGE.labels(route.name, name).set(policy.max_age)
            # Counters a panel or alert reads exist from the start at 0, so "none yet" is not "no data".
            LAST_GOOD_SERVED.labels(route.name, name)
            VERSION_REGRESSIONS.labels(route.name, name)


def type_label(route: str, event_type: str) -> str:
    """The `type` label of an event: its type if the route names it, else "other"."""
    return event_type if event_type in _bounds.types.get(route, ()) else OTHER


def source_label(source: str) -> str:
    """The `source` label of an event: its source if the configuration names it, else "other"."""
    return source if source in _bounds.sources else OTHER
