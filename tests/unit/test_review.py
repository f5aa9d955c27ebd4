"""Quarantine review as pure data (byzguard.review): decisions, status, replay and recheck headers, filters, auth."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import orjson
import pytest

from byzguard.review import (
    Action,
    BadFilterError,
    DecisionEntry,
    DecisionRecord,
    NotAuthenticatedError,
    Plan,
    QuarantinedRecord,
    ReviewFilter,
    ReviewLedger,
    Status,
    authenticate,
    counts,
    entity_view,
    item_detail,
    new_decision,
    parse_quarantined,
    parse_token_map,
    plan,
    recheck_headers,
    replay_headers,
    status_of,
)
from byzguard.routing import quarantine_headers, verified_headers
from byzguard.stamp import Stamper
from byzguard.state import EntityState
from byzguard.verdict import Code, Outcome, Reason

NOW = 1_790_000_000.0
STAMPER = Stamper("pricing")


def quarantined(offset: int = 7, *, subject: str = "sku-1", code: Code = Code.VERSION_REGRESSION,
                headers: Sequence[tuple[str, bytes]] | None = None, when: float = NOW,
                qtopic: str = "prices.quarantine") -> QuarantinedRecord:
    """A record as the guard writes it to quarantine, read back by review."""
    stamped = STAMPER.binary({"price": 9.5}, type="price.updated", subject=subject, version=3, time=when)
    hdrs = quarantine_headers(headers if headers is not None else stamped.headers, Outcome.QUARANTINED,
                              [Reason(code, "detail of " + code.value)], "prices", topic="prices", partition=2,
                              offset=offset, timestamp=when - 1, now=when)
    record = parse_quarantined(stamped.key, stamped.value, hdrs, topic=qtopic, partition=2, offset=offset + 100,
                               timestamp=when)
    assert record is not None
    return record


def entry(action: Action, at: float = NOW, reviewer: str = "alice", target: str = "") -> DecisionEntry:
    return DecisionEntry(action, reviewer, at, "note", target)


def decided(*actions: Action, qid: str = "prices-2-7") -> DecisionRecord:
    record: DecisionRecord | None = None
    for n, action in enumerate(actions):
        record = new_decision(record, entry(action, NOW + n), quarantine_id=qid, route="prices")
    assert record is not None
    return record


# --------------------------------------------------------------------------- decision records and status


def test_decision_record_round_trips_with_its_whole_history() -> None:
    """A decision value carries every entry, newest last, and the newest repeated at the top for readers."""
    record = decided(Action.APPROVE, Action.REJECT)
    raw = record.to_bytes()
    assert DecisionRecord.from_bytes(raw) == record
    top = orjson.loads(raw)
    assert (top["action"], top["quarantine_id"], len(top["history"])) == ("reject", "prices-2-7", 2)


def test_foreign_values_are_not_decision_records() -> None:
    """A value that is not a byzguard decision record is refused, not misread."""
    with pytest.raises(ValueError):
        DecisionRecord.from_bytes(b'{"hello": 1}')


@pytest.mark.parametrize(("actions", "status"), [
    ((), Status.PENDING),
    ((Action.APPROVE,), Status.APPROVED),
    ((Action.REJECT,), Status.REJECTED),
    ((Action.APPROVE, Action.REJECT), Status.REJECTED),
    ((Action.REJECT, Action.APPROVE), Status.APPROVED),
    ((Action.APPROVE, Action.REPLAYED), Status.REPLAYED),
    ((Action.REJECT, Action.RECHECK), Status.RECHECKED),
])
def test_status_follows_the_decision_history(actions: tuple[Action, ...], status: Status) -> None:
    """Approve and reject may change places until delivery; replayed and rechecked are final."""
    assert status_of(decided(*actions) if actions else None) is status


@pytest.mark.parametrize(("status", "action", "expected"), [
    (Status.PENDING, Action.APPROVE, Plan.APPLY),
    (Status.REJECTED, Action.APPROVE, Plan.APPLY),
    (Status.APPROVED, Action.REJECT, Plan.APPLY),
    (Status.APPROVED, Action.RECHECK, Plan.APPLY),
    (Status.APPROVED, Action.APPROVE, Plan.UNCHANGED),
    (Status.REJECTED, Action.REJECT, Plan.UNCHANGED),
    (Status.REPLAYED, Action.APPROVE, Plan.REFUSED),
    (Status.REPLAYED, Action.REJECT, Plan.REFUSED),
    (Status.RECHECKED, Action.APPROVE, Plan.REFUSED),
    (Status.PENDING, Action.REPLAYED, Plan.REFUSED),
])
def test_plan_refuses_actions_on_delivered_or_rechecked_records(status: Status, action: Action,
                                                                 expected: Plan) -> None:
    """A second approval of a delivered record is refused, so it can never be delivered twice."""
    assert plan(status, action)[0] is expected


# --------------------------------------------------------------------------- the ledger


def test_ledger_keeps_the_longest_history_whatever_the_order_read() -> None:
    """An older decision value read after a newer one (compaction, a lagging reader) does not roll status back."""
    ledger = ReviewLedger()
    ledger.add_record(quarantined())
    newer, older = decided(Action.APPROVE, Action.REPLAYED), decided(Action.APPROVE)
    ledger.add_decision(b"prices-2-7", newer.to_bytes())
    ledger.add_decision(b"prices-2-7", older.to_bytes())
    assert ledger.status("prices-2-7") is Status.REPLAYED


def test_ledger_tombstone_and_garbage() -> None:
    """A tombstone forgets the decision; an unreadable value is counted and ignored."""
    ledger = ReviewLedger()
    ledger.add_decision(b"prices-2-7", decided(Action.REJECT).to_bytes())
    ledger.add_decision(b"prices-2-7", b"not json")
    assert ledger.status("prices-2-7") is Status.REJECTED
    assert ledger.unreadable_decisions == 1
    ledger.add_decision(b"prices-2-7", None)
    assert ledger.status("prices-2-7") is Status.PENDING


def test_a_rechecked_record_links_to_the_quarantine_record_it_became() -> None:
    """The recheck entry's target is the re-sent record's coordinates, i.e. the new record's quarantine id."""
    ledger = ReviewLedger()
    old, new = quarantined(7), quarantined(9)
    ledger.add_record(old)
    ledger.add_record(new)
    recheck = new_decision(None, entry(Action.RECHECK, target=new.quarantine_id), quarantine_id=old.quarantine_id,
                           route="prices")
    ledger.add_decision(old.quarantine_id.encode(), recheck.to_bytes())
    old_item, new_item = ledger.item(old.quarantine_id), ledger.item(new.quarantine_id)
    assert old_item is not None and new_item is not None
    assert (old_item.status, old_item.rechecked_as) == (Status.RECHECKED, new.quarantine_id)
    assert (new_item.status, new_item.recheck_of) == (Status.PENDING, old.quarantine_id)


# --------------------------------------------------------------------------- quarantine records and headers


def test_parse_reads_reasons_coordinates_and_envelope() -> None:
    """Review reads the reasons, both coordinates and the event's source, type and entity from the record."""
    rec = quarantined(7)
    assert rec.quarantine_id == "prices-2-7"
    assert rec.codes == ("version.regression",)
    assert (rec.original_topic, rec.original_partition, rec.original_offset) == ("prices", 2, 7)
    assert (rec.topic, rec.offset, rec.detected_at) == ("prices.quarantine", 107, NOW)
    assert (rec.source, rec.type, rec.entity) == ("pricing", "price.updated", "sku-1")


def test_records_without_a_quarantine_id_are_not_review_items() -> None:
    """Anything on the quarantine topic without byzguard_quarantine_id is skipped."""
    assert parse_quarantined(b"k", b"v", [("ce_id", b"1")], topic="q", partition=0, offset=0, timestamp=None) is None


def test_replay_headers_replace_byzguard_headers_and_keep_the_producers() -> None:
    """A replayed record carries the producer's headers once and each replay mark exactly once."""
    producer = STAMPER.binary({"price": 1}, type="price.updated", subject="sku-1", version=1).headers
    # A record that already went through the guard once: its verdict headers must not pile up.
    passed = verified_headers(producer, Outcome.WARNED, [Reason(Code.VERSION_GAP, "gap")], "prices", NOW)
    rec = quarantined(headers=passed)
    approval = entry(Action.APPROVE, at=NOW + 5, reviewer="alice")
    headers = replay_headers(rec, approval, now=NOW + 9)
    names = [k for k, _ in headers]
    assert len(names) == len(set(names)), "no header may appear twice"
    assert [h for h in headers if not h[0].startswith("byzguard_")] == producer
    marks = dict(headers)
    assert marks["byzguard_replayed"] == b"1"
    assert marks["byzguard_quarantine_id"] == b"prices-2-7"
    assert marks["byzguard_reviewer"] == b"alice"
    assert float(marks["byzguard_decided_at"]) == NOW + 5
    assert marks["byzguard_verdict"] == b"approved"


def test_recheck_headers_are_the_producers_plus_the_link() -> None:
    """A re-sent record looks like the original to the guard, plus which quarantine record it comes from."""
    rec = quarantined()
    producer = [h for h in rec.headers if not h[0].startswith("byzguard_")]
    assert recheck_headers(rec) == [*producer, ("byzguard_recheck_of", b"prices-2-7")]


def test_detail_shows_decoded_data_and_history() -> None:
    """The detail view decodes the event's data and lists the decisions."""
    ledger = ReviewLedger()
    ledger.add_record(quarantined())
    ledger.add_decision(b"prices-2-7", decided(Action.REJECT).to_bytes())
    item = ledger.item("prices-2-7")
    assert item is not None
    detail = item_detail(item)
    assert detail["data"]["data"] == {"price": 9.5}
    assert detail["data"]["attributes"]["version"] == 3
    assert [h["action"] for h in detail["history"]] == ["reject"]


def test_entity_view_shows_the_last_known_good_value() -> None:
    """The entity state table value is shown as its version and parsed last-known-good data."""
    state = EntityState(version=4, vclock=None, content_hash=b"\x01" * 16, last_good=b'{"price": 10}',
                        last_good_type="price.updated", verified_at=NOW, event_time=None)
    view = entity_view(state.to_bytes())
    assert view is not None
    assert (view["version"], view["last_good"]) == (4, {"price": 10})
    assert entity_view(None) is None


# --------------------------------------------------------------------------- filters and counts


def _ledger() -> ReviewLedger:
    ledger = ReviewLedger()
    ledger.add_record(quarantined(1, subject="sku-1", code=Code.VERSION_REGRESSION, when=NOW))
    ledger.add_record(quarantined(2, subject="sku-2", code=Code.VERSION_CONFLICT, when=NOW + 60))
    ledger.add_record(quarantined(3, subject="sku-2", code=Code.INTEGRITY_MISMATCH, when=NOW + 120))
    ledger.add_decision(b"prices-2-3", decided(Action.REJECT, qid="prices-2-3").to_bytes())
    return ledger


@pytest.mark.parametrize(("query", "expected"), [
    ({}, ["prices-2-3", "prices-2-2", "prices-2-1"]),
    ({"reason": "version"}, ["prices-2-2", "prices-2-1"]),
    ({"reason": "version.conflict"}, ["prices-2-2"]),
    ({"status": "pending"}, ["prices-2-2", "prices-2-1"]),
    ({"status": "rejected,approved"}, ["prices-2-3"]),
    ({"entity": "sku-2", "source": "pricing", "type": "price.updated"}, ["prices-2-3", "prices-2-2"]),
    ({"since": str(NOW + 30)}, ["prices-2-3", "prices-2-2"]),
    ({"until": "2026-09-21T14:14:20Z"}, ["prices-2-1"]),
    ({"route": "other"}, []),
])
def test_filters_select_by_reason_status_entity_and_time(query: dict[str, str], expected: list[str]) -> None:
    """Every filter field narrows the list; a reason matches a code or a whole family."""
    assert [i.record.quarantine_id for i in _ledger().items(ReviewFilter.from_mapping(query))] == expected


@pytest.mark.parametrize("query", [{"status": "lost"}, {"since": "yesterday-ish"}])
def test_bad_filters_are_refused(query: dict[str, str]) -> None:
    """An unknown status or a time that is not a time is an error, not an empty list."""
    with pytest.raises(BadFilterError):
        ReviewFilter.from_mapping(query)


def test_counts_by_reason_and_status() -> None:
    """Counts tell how many records carry each reason code and stand in each status."""
    tally = counts(_ledger().items())
    assert tally["reason"] == {"version.regression": 1, "version.conflict": 1, "integrity.mismatch": 1}
    assert tally["status"] == {"pending": 2, "rejected": 1}


# --------------------------------------------------------------------------- authentication


def _basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def test_a_named_token_proves_its_reviewer() -> None:
    """With per-reviewer tokens the token names the reviewer, whatever name the request claims."""
    tokens = parse_token_map("alice:tok-a, bob:tok-b")
    assert authenticate("Bearer tok-b", claimed_reviewer="mallory", shared_token=None, named_tokens=tokens) == "bob"


def test_the_shared_token_needs_a_name_for_writes_only() -> None:
    """The shared token plus a declared name may act; without a name it may only read."""
    assert authenticate("Bearer s3cret", claimed_reviewer="carol", shared_token="s3cret", named_tokens={}) == "carol"
    assert authenticate(_basic("dave", "s3cret"), claimed_reviewer=None, shared_token="s3cret",
                        named_tokens={}) == "dave"
    with pytest.raises(NotAuthenticatedError):
        authenticate("Bearer s3cret", claimed_reviewer=None, shared_token="s3cret", named_tokens={})
    assert authenticate("Bearer s3cret", claimed_reviewer=None, shared_token="s3cret", named_tokens={},
                        require_name=False) == ""


@pytest.mark.parametrize("header", [None, "", "Bearer wrong", "Token s3cret", "Basic !!!", _basic("eve", "nope")])
def test_missing_or_wrong_credentials_are_refused(header: str | None) -> None:
    """No credentials, another scheme or a wrong token never authenticates."""
    with pytest.raises(NotAuthenticatedError):
        authenticate(header, claimed_reviewer="eve", shared_token="s3cret", named_tokens={"t": "bob"})


def test_review_is_closed_when_no_token_is_configured() -> None:
    """A deployment without review tokens refuses every review action: there are no anonymous writes."""
    with pytest.raises(NotAuthenticatedError, match="disabled"):
        authenticate("Bearer anything", claimed_reviewer="x", shared_token=None, named_tokens={})


def test_token_map_must_name_every_token() -> None:
    """A per-reviewer token list with an entry lacking a name or a token is a configuration error."""
    with pytest.raises(ValueError):
        parse_token_map("alice:tok,justatoken")
