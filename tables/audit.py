"""The join state of an audit rule: pending observations per join key, co-partitioned with the rule's
repartition topic (RocksDB-backed, with a changelog like every table)."""

from __future__ import annotations

from typing import Any

import faust
from faust.types import TableT

from byzguard.audit import AuditRule
from tables import declare_table


def audit_table_name(rule: AuditRule) -> str:
    """The join table's name (its changelog topic is `<app_id>-<name>-changelog`)."""
    return f"audit-{rule.name}-pending_by_key"


def declare_audit_table(app: faust.App, rule: AuditRule, options: dict[str, Any]) -> TableT[bytes, bytes]:
    """Declare a rule's join table on `app` (RocksDB `options` as tables.store_options gives them); values are
    byzguard.audit.JoinState bytes."""
    return declare_table(app, audit_table_name(rule), rule.partitions, options)
