"""Create the routes' topics before the worker starts, and make the partition counts agree.

Tables are co-partitioned with their inputs: the entity state of partition p lives in changelog partition p.
An input topic that already exists keeps its partition count (byzguard adopts it); byzguard's own outputs
and changelogs must then match it, or the worker refuses to start with what to do about it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from byzguard.config import GuardConfig, Route
from byzguard.errors import ConfigError

log = logging.getLogger(__name__)


async def _partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    described = await admin.describe_topics(topics)
    counts = {}
    for topic in described:
        if topic.get("error_code", 0) == 0 and topic.get("partitions"):
            counts[topic["topic"]] = len(topic["partitions"])
    return counts


async def provision(bootstrap: str, config: GuardConfig, app_id: str, *, timeout: float = 120.0) -> GuardConfig:
    """Create missing topics; return the configuration with each route's partitions as on the broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await admin.start()
            break
        except Exception as exc:  # a broker outage is waited out, not crashed on
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("broker %s not reachable (%s); retrying", bootstrap, exc)
            await asyncio.sleep(2)
    try:
        routes = []
        for route in config.routes:
            names = [*route.inputs, route.verified_topic, route.quarantine_topic]
            changelogs = [f"{app_id}-{route.name}-{t}-changelog" for t in ("state_by_entity", "lamport_by_source")]
            counts = await _partition_counts(admin, names + changelogs)
            existing_inputs = {counts[t] for t in route.inputs if t in counts}
            if len(existing_inputs) > 1:
                raise ConfigError(f"route {route.name!r}: its input topics have different partition counts "
                                  f"{sorted(existing_inputs)}; inputs of one route must be co-partitioned")
            partitions = existing_inputs.pop() if existing_inputs else route.partitions
            if partitions != route.partitions:
                log.warning("route %s: input topics have %d partitions (configured %d); using %d",
                            route.name, partitions, route.partitions, partitions)
            for topic in [route.verified_topic, route.quarantine_topic, *changelogs]:
                if topic in counts and counts[topic] != partitions:
                    raise ConfigError(
                        f"route {route.name!r}: topic {topic!r} has {counts[topic]} partitions but the inputs have "
                        f"{partitions}; outputs and state must be co-partitioned with the inputs. Recreate "
                        f"{topic!r} with {partitions} partitions (changelogs are rebuilt from nothing, so only do "
                        f"that to a fresh deployment) or give the inputs {counts[topic]} partitions.")
            missing = [t for t in names if t not in counts]
            if missing:
                try:
                    await admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
                except TopicAlreadyExistsError:
                    pass  # another worker of the group created it first
            routes.append(dataclasses.replace(route, partitions=partitions))
        by_input = {topic: r for r in routes for topic in r.inputs}
        return dataclasses.replace(config, routes=tuple(routes), route_by_input=by_input)
    finally:
        await admin.close()
