"""Create the routes' topics before the worker starts, and make the partition counts agree.

Tables are co-partitioned with their inputs: the entity state of partition p lives in changelog partition p.
An input topic that already exists keeps its partition count (byzguard adopts it); byzguard's own outputs
and changelogs must then match it, or the worker refuses to start with what to do about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from byzguard.audit import AuditRule
from byzguard.config import GuardConfig, Partitioning
from byzguard.errors import ConfigError
from tables import table_names
from tables.audit import audit_table_name
from topics import route_repartition_topic_name, ticks_topic_name
from topics.audit import repartition_topic_name

log = logging.getLogger(__name__)


async def _partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    # Only existing topics are described: aiokafka's describe_topics sends a Metadata request that lets the
    # broker auto-create what it names (auto.create.topics.enable, on by default), and an auto-created topic
    # has num.partitions (1) partitions instead of the route's. Listing all topics never creates any.
    existing = set(await admin.list_topics())
    wanted = [t for t in topics if t in existing]
    if not wanted:
        return {}
    described = await admin.describe_topics(wanted)
    counts = {}
    for topic in described:
        if topic.get("error_code", 0) == 0 and topic.get("partitions"):
            counts[topic["topic"]] = len(topic["partitions"])
    return counts


async def _create_topics(admin: AIOKafkaAdminClient, topics: list[str], partitions: int) -> None:
    """Create topics; one that another worker created meanwhile is fine, any other refusal is raised."""
    try:
        response = await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    except TopicAlreadyExistsError:
        return
    # aiokafka reports per-topic errors in the response instead of raising them.
    for error in response.to_object().get("topic_errors", []):
        code = error.get("error_code", 0)
        if code not in (0, TopicAlreadyExistsError.errno):
            raise ConfigError(f"cannot create topic {error.get('topic')!r}: error {code} "
                              f"{error.get('error_message') or ''}".rstrip())


async def _provision_audit(admin: AIOKafkaAdminClient, rule: AuditRule, app_id: str) -> AuditRule:
    """Create an audit rule's repartition and discrepancies topics; its join table is co-partitioned with the
    repartition topic, so an existing repartition topic's count is adopted and the changelog must match it."""
    repartition = repartition_topic_name(app_id, rule)
    changelog = f"{app_id}-{audit_table_name(rule)}-changelog"
    counts = await _partition_counts(admin, [repartition, changelog, rule.discrepancies_topic])
    partitions = counts.get(repartition, rule.partitions)
    if changelog in counts and counts[changelog] != partitions:
        raise ConfigError(f"audit {rule.name!r}: {changelog!r} has {counts[changelog]} partitions but {repartition!r} "
                          f"has {partitions}; delete both (the join state of a fresh deployment only) to start over")
    for topic in (repartition, rule.discrepancies_topic):
        if topic not in counts:
            await _create_topics(admin, [topic], partitions)
    if changelog not in counts:
        # Created here rather than by faust at start, so the join agent's first table write does not race
        # faust's metadata for a topic it has just created (faust then sees 0 partitions and crashes).
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(changelog, partitions, 1, topic_configs={"cleanup.policy": "compact"})])
    return dataclasses.replace(rule, partitions=partitions)


async def provision(
    bootstrap: str, config: GuardConfig, app_id: str, *,
    timeout: float = 120.0,
) -> GuardConfig:
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
            if route.causal.buffer:
                names.append(ticks_topic_name(app_id, route))
            if route.receipts_topic:
                names.append(route.receipts_topic)
            if route.partitioning is Partitioning.REPARTITION:
                # Co-partitioned with the state like the outputs: the verify agent reads it instead of the inputs.
                names.append(route_repartition_topic_name(app_id, route))
            changelogs = [f"{app_id}-{table}-changelog" for table in table_names(route)]
            counts = await _partition_counts(admin, names + changelogs)
            existing_inputs = {counts[t] for t in route.inputs if t in counts}
            if len(existing_inputs) > 1:
                raise ConfigError(f"route {route.name!r}: its input topics have different partition counts "
                                  f"{sorted(existing_inputs)}; inputs of one route must be co-partitioned")
            partitions = existing_inputs.pop() if existing_inputs else route.partitions
            if partitions != route.partitions:
                log.warning("route %s: input topics have %d partitions (configured %d); using %d",
                            route.name, partitions, route.partitions, partitions)
            for topic in [*names[len(route.inputs):], *changelogs]:
                if topic in counts and counts[topic] != partitions:
                    raise ConfigError(
                        f"route {route.name!r}: topic {topic!r} has {counts[topic]} partitions but the inputs have "
                        f"{partitions}; outputs and state must be co-partitioned with the inputs. Recreate "
                        f"{topic!r} with {partitions} partitions (changelogs are rebuilt from nothing, so only do "
                        f"that to a fresh deployment) or give the inputs {counts[topic]} partitions.")
            missing = [t for t in names if t not in counts]
            if missing:
                await _create_topics(admin, missing, partitions)
            routes.append(dataclasses.replace(route, partitions=partitions))
        by_input = {topic: r for r in routes for topic in r.inputs}
        audits = tuple([await _provision_audit(admin, rule, app_id) for rule in config.audits])
        return dataclasses.replace(config, routes=tuple(routes), route_by_input=by_input, audits=audits)
    finally:
        await admin.close()
