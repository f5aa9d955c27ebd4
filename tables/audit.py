"""The join state of an audit rule: pending observations per join key, co-partitioned with the rule's
repartition topic (a RocksDB database per partition, with a changelog like every table; app/runtime/audits.py)."""

from __future__ import annotations

from byzguard.audit import AuditRule


def audit_table_name(rule: AuditRule) -> str:
    """The join table's name (its changelog topic is `<app_id>-<name>-changelog`)."""
    return f"audit-{rule.name}-pending_by_key"
