"""The size limits of the topics the batched runtime writes: each topic's `max.message.bytes`, read from the broker.

A record is measured before it is added (byzguard.routing `record_size`): one that would not fit its destination
is not sent (a bounded stub goes to quarantine instead, `output.too_large`), and `RecordBatches` refuses one that
does not fit a whole record batch (`RecordTooLargeError`) instead of letting the broker fail its batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from app.sidereads import known_partitions

log = logging.getLogger(__name__)

#: A topic's message size limit when the broker does not say (Kafka's default `message.max.bytes`).
DEFAULT_LIMIT = 1_048_588


class RecordTooLargeError(ValueError):
    """A record does not fit its destination topic (`max.message.bytes`); callers check its size first."""


async def load_limits(bootstrap: str, topics: Sequence[str], *, retry_for: float = 120.0) -> dict[str, int]:
    """Each existing topic's `max.message.bytes` (its own setting, else the broker's `message.max.bytes`); a topic
    that does not exist is left out. A broker that does not answer is waited for up to `retry_for` seconds."""
    deadline = time.monotonic() + retry_for
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
        try:
            await admin.start()
            # Asked about by name without creating any (describe_configs of a missing topic is only an error, but
            # the cluster's whole topic list is a large answer on a busy broker).
            existing = await known_partitions(admin._client, topics)
            wanted = [t for t in dict.fromkeys(topics) if t in existing]
            if not wanted:
                return {}
            return await topic_settings(admin, wanted, "max.message.bytes")
        except Exception as exc:  # a broker outage is waited out, not crashed on
            if time.monotonic() > deadline:
                raise
            log.warning("cannot read topic limits from %s (%r); retrying", bootstrap, exc)
            await asyncio.sleep(2)
        finally:
            await admin.close()


async def topic_settings(admin: AIOKafkaAdminClient, topics: Sequence[str], name: str) -> dict[str, int]:
    """Each topic's integer setting `name` as the broker applies it (the topic's own, else the broker's); a topic the
    broker answers with an error for is left out."""
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, t, {name: None}) for t in topics])
    found: dict[str, int] = {}
    for response in responses:
        for resource in response.to_object().get("resources", []):
            if resource.get("error_code", 0):
                continue
            for entry in resource.get("config_entries", []):
                if entry.get("config_names") == name and entry.get("config_value"):
                    found[resource["resource_name"]] = int(entry["config_value"])
    return found
