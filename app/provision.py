"""Create the routes' topics before the worker starts, and make the partition counts agree.

Tables are co-partitioned with their inputs: the entity state of partition p lives in changelog partition p.
An input topic that already exists keeps its partition count (byzguard adopts it); byzguard's own outputs
and changelogs must then match it, or the worker refuses to start with what to do about it.

Sizes: a copy of any record an input topic accepts must fit where byzguard writes it. The outputs (verified,
quarantine, receipts) are created with `max.message.bytes` of the largest input limit (the input
topic's own setting, else the broker's `message.max.bytes`) plus OUTPUT_HEADROOM for byzguard's headers, which
are bounded (byzguard.routing OWN_HEADERS_MAX); the state changelogs with STATE_FACTOR times the input limit plus
the headroom (an entity's state may keep its last-known-good value beside its bookkeeping). An output that exists
with less room is kept and warned about: a record that does not fit it is quarantined as a stub.

The causal-ticks topics (`<app_id>-<route>-causal-ticks`) that earlier releases created for the faust agent runtime
are no longer created; one that exists on the broker is left alone (nothing reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app.runtime.limits import DEFAULT_LIMIT, load_limits
from app.sidereads import known_partitions
from byzguard.audit import AuditRule
from byzguard.config import GuardConfig, Partitioning, Route
from byzguard.errors import ConfigError
from byzguard.routing import OWN_HEADERS_MAX
from tables import table_names
from tables.audit import audit_table_name
from topics import route_repartition_topic_name
from topics.audit import repartition_topic_name

log = logging.getLogger(__name__)

#: Room above the inputs' message size limit that output topics get for byzguard's headers (and a stub's fields).
OUTPUT_HEADROOM = 4 * OWN_HEADERS_MAX
#: A state changelog takes records of this many times the inputs' limit (plus the headroom).
STATE_FACTOR = 2


async def _partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """The partition count of each of `topics` that exists, asked of the broker for these topics alone and without
    creating any (app.sidereads `known_partitions`): an auto-created topic would have num.partitions (1)
    partitions instead of the route's."""
    known = await known_partitions(admin._client, topics)
    return {topic: len(partitions) for topic, partitions in known.items() if partitions}


async def _create_topics(admin: AIOKafkaAdminClient, topics: list[str], partitions: int,
                         configs: dict[str, str] | None = None) -> None:
    """Create topics; one that another worker created meanwhile is fine, any other refusal is raised."""
    try:
        response = await admin.create_topics([NewTopic(t, partitions, 1, topic_configs=dict(configs or {}))
                                              for t in topics])
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


async def _provision_outputs(bootstrap: str, admin: AIOKafkaAdminClient, route: Route, outputs: list[str],
                             changelogs: list[str], counts: dict[str, int], partitions: int) -> None:
    """Create a route's missing outputs and changelogs with room for a copy of any input record (module doc)."""
    for _ in range(50):  # an input created just now may take a moment to show in the metadata
        limits = await load_limits(bootstrap, [*route.inputs, *outputs, *changelogs])
        if all(t in limits for t in route.inputs):
            break
        await asyncio.sleep(0.2)
    input_limit = max(limits.get(t, 0) for t in route.inputs)
    if not input_limit:
        input_limit = DEFAULT_LIMIT
        log.warning("route %s: cannot read the message size limit of %s; assuming Kafka's default of %d bytes",
                    route.name, list(route.inputs), input_limit)
    wanted = {t: input_limit + OUTPUT_HEADROOM for t in outputs}
    wanted.update({t: STATE_FACTOR * input_limit + OUTPUT_HEADROOM for t in changelogs})
    for topic, size in wanted.items():
        if topic in counts:
            if limits.get(topic, size) < size:
                what = ("a state record that does not fit stops the worker" if topic in changelogs else
                        "records that do not fit are quarantined as stubs (output.too_large)")
                log.warning("route %s: topic %s takes records of up to %d bytes (max.message.bytes), less than the "
                            "%d byzguard may need to write there; %s. Raise it with: kafka-configs --alter "
                            "--entity-type topics --entity-name %s --add-config max.message.bytes=%d",
                            route.name, topic, limits[topic], size, what, topic, size)
            continue
        configs = {"max.message.bytes": str(size)}
        if topic in changelogs:
            configs["cleanup.policy"] = "compact"
        await _create_topics(admin, [topic], partitions, configs)


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
            if route.receipts_topic:
                names.append(route.receipts_topic)
            if route.partitioning is Partitioning.REPARTITION:
                # Co-partitioned with the state like the outputs: the verify stage reads it instead of the inputs.
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
            missing_inputs = [t for t in route.inputs if t not in counts]
            if missing_inputs:
                await _create_topics(admin, missing_inputs, partitions)
            outputs = names[len(route.inputs):]
            await _provision_outputs(bootstrap, admin, route, outputs, changelogs, counts, partitions)
            routes.append(dataclasses.replace(route, partitions=partitions))
        by_input = {topic: r for r in routes for topic in r.inputs}
        audits = tuple([await _provision_audit(admin, rule, app_id) for rule in config.audits])
        return dataclasses.replace(config, routes=tuple(routes), route_by_input=by_input, audits=audits)
    finally:
        await admin.close()
