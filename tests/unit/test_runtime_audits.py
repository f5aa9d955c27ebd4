"""app/runtime/audits.py without a broker: what an audit rule's forward stage maps a verified record to, and the
join table's files. (The join's batches, punctuations and transactions run on the real broker:
tests/integration/test_audit.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from agents.audit import H_AUDIT_KIND, H_AUDIT_RULE, CheckRecorder
from app.runtime.audits import AuditForward
from app.runtime.state import INPUTS_KEY, PartitionState
from byzguard.partitioner import partition_for
from byzguard.processor import PENDING
from byzguard.routing import H_VERDICT
from byzguard.stamp import Stamper
from tests.unit.test_runtime_stages import Msg, Out, _config
from topics.audit import repartition_topic_name


def _verified(kind: str, data: dict[str, Any], subject: str, *, verdict: bytes = b"verified") -> Msg:
    stamped = Stamper("orders").binary(data, type=kind, subject=subject, version=1, time=1_800_000_000.0)
    return Msg("out", 0, 0, stamped.key, stamped.value, [*stamped.headers, (H_VERDICT, verdict)])


def test_the_audit_forward_stage_rekeys_observations_by_join_key(tmp_path: Path) -> None:
    """A verified record of a rule's side becomes an observation keyed by its join key at the key's murmur2
    partition of `<app_id>-audit-<rule>-repartition`; a suspect record (fail-open) and other types are skipped."""
    config = _config(tmp_path)
    rule = config.audits[0]
    stage = AuditForward("app", config, rule, CheckRecorder(rule))
    stage.configure({}, {"audit.discrepancies": 6})
    out = Out()
    stage.forward(_verified("order.confirmed", {"paymentId": "pay-7", "total": 100}, "order-7"), out, 0.0)  # type: ignore[arg-type]
    stage.forward(_verified("order.confirmed", {"paymentId": "pay-8", "total": 1}, "order-8", verdict=b"suspect"),
                  out, 0.0)  # type: ignore[arg-type]
    [(topic, partition, key, value, headers)] = out.records
    assert (topic, partition, key, headers) == (repartition_topic_name("app", rule), partition_for(b"pay-7", 5),
                                                b"pay-7", [])
    assert orjson.loads(value or b"null")  # an Observation (byzguard.audit round-trips it)


def test_a_subject_record_without_a_join_key_is_a_missing_discrepancy_at_once(tmp_path: Path) -> None:
    """An order with no payment id cannot be joined: it is a `missing` discrepancy on the audit topic at once,
    keyed and with the headers the faust runtime gives it, at the key's partition of the audit topic."""
    config = _config(tmp_path)
    rule = config.audits[0]
    stage = AuditForward("app", config, rule, CheckRecorder(rule))
    stage.configure({}, {"audit.discrepancies": 6})
    out = Out()
    stage.forward(_verified("order.confirmed", {"total": 100}, "order-9"), out, 0.0)  # type: ignore[arg-type]
    [(topic, partition, key, value, headers)] = out.records
    assert topic == "audit.discrepancies" and key is not None and partition == partition_for(key, 6)
    assert headers == [(H_AUDIT_RULE, b"paid"), (H_AUDIT_KIND, b"missing")]
    assert orjson.loads(value or b"{}")["kind"] == "missing"


def test_the_audit_join_table_is_fausts_and_holds_its_input_offsets(tmp_path: Path) -> None:
    """A join partition's database is faust's file of the rule's table (`audit-<rule>-pending_by_key-<p>.db`);
    a store writes its state and its next input offset together, read back after a reopen."""
    opts: dict[str, Any] = {}
    part = PartitionState(tmp_path, None, 2, opts, tables={PENDING: "audit-paid-pending_by_key"})
    assert part.paths == {PENDING: tmp_path / "audit-paid-pending_by_key-2.db"}
    part.readers[PENDING].put(b"pay-7", b"state")
    part.store({PENDING: 12}, {"app-audit-paid-repartition": 40})
    part.close()
    again = PartitionState(tmp_path, None, 2, opts, tables={PENDING: "audit-paid-pending_by_key"})
    assert again.readers[PENDING].get(b"pay-7") == b"state"
    assert again.input_offsets() == {"app-audit-paid-repartition": 40} and again.changelog_offset(PENDING) == 12
    assert set(again.readers) == {PENDING}
    assert again.dbs[PENDING].get(INPUTS_KEY) is not None
    again.close()
