"""What the verify stream records of each routed record besides its outputs: the metrics (docs/operations.md).

The batched runtime (app/runtime/loop.py, app/runtime/stages.py) calls `observe` once per routed record.
"""

from __future__ import annotations

from typing import Any

from app import metrics
from byzguard.guard import Routed
from byzguard.verdict import Code, Outcome

#: Metric children by label values (prometheus_client's labels() costs microseconds per call, per event).
_EVENTS: dict[tuple[str, str, str], Any] = {}
_DATA_AGE: dict[tuple[str, str], Any] = {}


def observe(route: str, routed: Routed, now: float) -> None:
    """Count one routed record in the metrics."""
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
