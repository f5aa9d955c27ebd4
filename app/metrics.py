"""Prometheus metrics of a worker. Labels are bounded: never an entity id or event id."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

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
