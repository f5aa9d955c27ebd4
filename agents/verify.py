"""verify_events: the guard's agent. Reads each record, asks byzguard.guard for its fate, routes it."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import faust
from mode.supervisors import CrashingSupervisor

from app import metrics
from byzguard.config import Route
from byzguard.guard import Guard, RecordIn
from byzguard.verdict import Code, Outcome
from tables import RouteTables
from topics import RouteTopics

log = logging.getLogger(__name__)


def attach_verify_agent(app: faust.App, guard: Guard, route: Route, topics: RouteTopics,
                        tables: RouteTables) -> Any:
    """Register the verify agent of one route on `app`."""
    entities = tables.state_by_entity
    lamports = tables.lamport_by_source
    verified_topic = topics.verified_topic
    quarantine_topic = topics.quarantine_topic
    name = route.name
    events_metric = metrics.EVENTS
    failures_metric = metrics.CHECK_FAILURES
    latency = metrics.VERIFY_SECONDS.labels(name)

    async def verify_events(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            msg = event.message
            started = time.perf_counter()
            now = time.time()
            routed = guard.process(
                RecordIn(msg.key, msg.value, msg.headers or (), msg.topic, msg.partition, msg.offset,
                         msg.timestamp),
                route, entities, lamports, now=now,
            )
            if routed.entity_key is not None:
                entities[routed.entity_key] = routed.entity_value
            if routed.lamport_key is not None:
                lamports[routed.lamport_key] = routed.lamport_value
            # Outputs keep the input's partition: they are co-partitioned, and no key hashing is needed.
            if routed.verified_headers is not None:
                await verified_topic.send(key=msg.key, value=msg.value, partition=msg.partition,
                                          headers=routed.verified_headers)
            if routed.quarantine_headers is not None:
                await quarantine_topic.send(key=msg.key, value=msg.value, partition=msg.partition,
                                            headers=routed.quarantine_headers)
            latency.observe(time.perf_counter() - started)
            decision = routed.decision
            env = routed.envelope
            event_type = env.type if env is not None else "unknown"
            source = env.source if env is not None else "unknown"
            events_metric.labels(name, event_type, decision.outcome.value).inc()
            for reason in decision.reasons:
                failures_metric.labels(name, reason.check, reason.code.value, reason.severity.value,
                                       source).inc()
                if reason.code is Code.VERSION_REGRESSION:
                    metrics.VERSION_REGRESSIONS.labels(name, event_type).inc()
            if env is not None and env.time is not None and decision.outcome is not Outcome.DUPLICATE:
                metrics.DATA_AGE.labels(name, event_type).observe(max(0.0, now - env.time))
            yield None

    # A crashing verify agent must stop the worker loudly (and let Kafka redeliver to a restarted one),
    # never be restarted silently in a loop or die unnoticed.
    return app.agent(topics.inputs_topic, name=f"verify_events-{name}",
                     supervisor_strategy=CrashingSupervisor)(verify_events)
