"""Topic declarations of the cross-stream audits: the verified topics a rule reads, its internal repartition
topic (records keyed by the join key; also carries the window-expiry ticks) and its discrepancies topic."""

from __future__ import annotations

from dataclasses import dataclass

import faust

from byzguard.audit import AuditRule

_RAW = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}


@dataclass(frozen=True)
class AuditTopics:
    """The faust topics of one audit rule."""

    sources_topic: faust.TopicT
    repartition_topic: faust.TopicT
    discrepancies_topic: faust.TopicT


def repartition_topic_name(app_id: str, rule: AuditRule) -> str:
    """The internal topic that co-partitions both sides of a rule by the join key."""
    return f"{app_id}-audit-{rule.name}-repartition"


def declare_audit_topics(app: faust.App, rule: AuditRule) -> AuditTopics:
    """Declare a rule's topics on `app` (app.provision creates the internal ones before the worker starts)."""
    return AuditTopics(
        sources_topic=app.topic(*rule.topics, **_RAW),  # type: ignore[arg-type]
        repartition_topic=app.topic(repartition_topic_name(app.conf.id, rule), partitions=rule.partitions,
                                    **_RAW),  # type: ignore[arg-type]
        discrepancies_topic=app.topic(rule.discrepancies_topic, **_RAW),  # type: ignore[arg-type]
    )
