"""The internal topics of a route, by name: a route's inputs, verified, quarantine and receipts topics are named in
its configuration; the internal repartition topic of a route that moves records to their entity's partition
before they are checked (`partitioning: repartition`) is named here (app/provision.py creates it)."""

from __future__ import annotations

from byzguard.config import Route


def route_repartition_topic_name(app_id: str, route: Route) -> str:
    """The internal topic that holds a route's input records at the partition of their entity id."""
    return f"{app_id}-{route.name}-entities-repartition"
