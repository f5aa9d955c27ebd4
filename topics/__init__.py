"""Topic declarations, built from the configuration: each route's inputs, verified and quarantine topics,
the internal tick topic that drives causal-buffer deadlines, and the internal repartition topic of a route
that moves records to their entity's partition before they are checked (`partitioning: repartition`)."""

from __future__ import annotations

from dataclasses import dataclass

import faust

from byzguard.config import Partitioning, Route


@dataclass(frozen=True)
class RouteTopics:
    """The faust topics of one route. Outputs are co-partitioned with the inputs.

    `inputs_topic` is what the verify agent reads: the route's inputs, or, on a route that re-partitions,
    `repartition_topic`; the route's own inputs are then `sources_topic`, which the repartition agent reads.
    """

    inputs_topic: faust.TopicT
    verified_topic: faust.TopicT
    quarantine_topic: faust.TopicT
    ticks_topic: faust.TopicT | None = None
    receipts_topic: faust.TopicT | None = None
    sources_topic: faust.TopicT | None = None
    repartition_topic: faust.TopicT | None = None


def ticks_topic_name(app_id: str, route: Route) -> str:
    """The internal topic whose records tell a partition's agent to expire held events."""
    return f"{app_id}-{route.name}-causal-ticks"


def route_repartition_topic_name(app_id: str, route: Route) -> str:
    """The internal topic that holds a route's input records at the partition of their entity id."""
    return f"{app_id}-{route.name}-entities-repartition"


def declare_route_topics(app: faust.App, route: Route) -> RouteTopics:
    """Declare a route's topics on `app` (app.provision creates them before the worker starts)."""
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw",
           "partitions": route.partitions}
    inputs = list(route.inputs)
    sources = repartition = None
    if route.partitioning is Partitioning.REPARTITION:
        sources = app.topic(*inputs, **raw)  # type: ignore[arg-type]
        inputs = [route_repartition_topic_name(app.conf.id, route)]
        repartition = app.topic(inputs[0], **raw)  # type: ignore[arg-type]
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
        sources_topic=sources,
        repartition_topic=repartition,
    )
