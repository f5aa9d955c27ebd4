"""Topic declarations, built from the configuration: each route's inputs, verified and quarantine topics,
and the internal tick topic that drives causal-buffer deadlines."""

from __future__ import annotations

from dataclasses import dataclass

import faust

from byzguard.config import Route


@dataclass(frozen=True)
class RouteTopics:
    """The faust topics of one route. Outputs are co-partitioned with the inputs."""

    inputs_topic: faust.TopicT
    verified_topic: faust.TopicT
    quarantine_topic: faust.TopicT
    ticks_topic: faust.TopicT | None = None
    receipts_topic: faust.TopicT | None = None


def ticks_topic_name(app_id: str, route: Route) -> str:
    """The internal topic whose records tell a partition's agent to expire held events."""
    return f"{app_id}-{route.name}-causal-ticks"


def declare_route_topics(app: faust.App, route: Route) -> RouteTopics:
    """Declare a route's topics on `app` (app.provision creates them before the worker starts)."""
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw",
           "partitions": route.partitions}
    inputs = list(route.inputs)
    ticks = None
    if route.causal.buffer:
        ticks_name = ticks_topic_name(app.conf.id, route)
        inputs.append(ticks_name)
        ticks = app.topic(ticks_name, **raw)  # type: ignore[arg-type]
    return RouteTopics(
        inputs_topic=app.topic(*inputs, **raw),  # type: ignore[arg-type]
        verified_topic=app.topic(route.verified_topic, **raw),  # type: ignore[arg-type]
        quarantine_topic=app.topic(route.quarantine_topic, **raw),  # type: ignore[arg-type]
        ticks_topic=ticks,
        receipts_topic=app.topic(route.receipts_topic, **raw) if route.receipts_topic else None,  # type: ignore[arg-type]
    )
