"""What the cross-stream audits (app/runtime/audits.py, docs/audits.md) record per check besides the
discrepancies: the headers of a discrepancy record and the audit metrics (`CheckRecorder`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from app import metrics
from byzguard.audit import AgreementWindow, AuditRule, Check

H_AUDIT_RULE = "byzguard_audit_rule"
H_AUDIT_KIND = "byzguard_audit_kind"


def header(headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None, name: str) -> bytes | None:
    """The last value of a record header, or None."""
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    found = None
    for key, value in items:
        if key == name:
            found = value
    return found


class CheckRecorder:
    """Counts a rule's checks in the metrics and keeps its rolling agreement rate."""

    def __init__(self, rule: AuditRule) -> None:
        self.rule = rule
        self.window = AgreementWindow()
        self.checks = metrics.AUDIT_CHECKS.labels(rule.name)
        self.agreement = metrics.AUDIT_AGREEMENT.labels(rule.name)

    def record(self, checks: Iterable[Check], wall: float) -> None:
        for check in checks:
            self.checks.inc()
            self.window.record(check.passed, wall)
            if check.discrepancy is not None:
                metrics.AUDIT_DISCREPANCIES.labels(self.rule.name, check.discrepancy.kind.value).inc()
        self.refresh(wall)

    def refresh(self, wall: float) -> None:
        rate = self.window.rate(wall)
        if rate is not None:
            self.agreement.set(rate)
