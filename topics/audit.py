"""The internal topic of a cross-stream audit rule, by name: its repartition topic (records keyed by the join key).
The verified topics a rule reads and its discrepancies topic are named in the configuration."""

from __future__ import annotations

from byzguard.audit import AuditRule


def repartition_topic_name(app_id: str, rule: AuditRule) -> str:
    """The internal topic that co-partitions both sides of a rule by the join key."""
    return f"{app_id}-audit-{rule.name}-repartition"
