"""Topic declarations, built from the configuration: each route's inputs, verified and quarantine topics."""

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


def declare_route_topics(app: faust.App, route: Route) -> RouteTopics:
    """Declare a route's topics on `app` (faust creates the missing ones at start)."""
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw",
           "partitions": route.partitions}
    return RouteTopics(
        inputs_topic=app.topic(*route.inputs, **raw),  # type: ignore[arg-type]
        verified_topic=app.topic(route.verified_topic, **raw),  # type: ignore[arg-type]
        quarantine_topic=app.topic(route.quarantine_topic, **raw),  # type: ignore[arg-type]
    )
