"""What byzguard itself writes is bounded whatever the input: reasons, ids in receipts, the size estimate the
agents decide with, and the stub that stands for a record too large to copy (`output.too_large`)."""

from __future__ import annotations

import hashlib

import orjson
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from byzguard import routing
from byzguard.review import ReviewItem, Status, item_detail, parse_quarantined
from byzguard.verdict import Code, Outcome, Reason


def _coords() -> dict[str, object]:
    return {"topic": "t" * 249, "partition": 7, "offset": 123456789, "timestamp": 1.5e9}


def test_a_long_detail_is_cut_and_many_reasons_stay_under_the_bound() -> None:
    """A 100 KB detail is cut, and 1,000 reasons encode to at most MAX_REASONS_BYTES, saying how many are left out."""
    reasons = [Reason(Code.INVARIANT_VIOLATED, "\u2603\x01" * 50_000)] * 1000
    raw = routing.encode_reasons(reasons)
    assert len(raw) <= routing.MAX_REASONS_BYTES
    decoded = routing.decode_reasons(raw)
    assert decoded[0]["detail"].endswith(f"({100_000 - routing.MAX_DETAIL_CHARS} more characters)")
    assert "more reasons not shown" in decoded[-1]["detail"]


def test_few_short_reasons_are_written_whole() -> None:
    """Ordinary reasons are not touched."""
    reasons = [Reason(Code.VERSION_REGRESSION, "version 3 after 5"), Reason(Code.TIME_STALE, "2 h old")]
    assert routing.decode_reasons(routing.encode_reasons(reasons)) == [r.as_dict() for r in reasons]


def test_a_long_event_id_is_hashed_in_receipt_keys_and_bodies_and_a_short_one_kept() -> None:
    """A 100 KB id becomes sha256:<hex> in the receipt's key and body; a normal id stays itself."""
    long_id = "x" * 100_000
    assert routing.receipt_key(long_id) == b"sha256:" + hashlib.sha256(long_id.encode()).hexdigest().encode()
    body = routing.receipt(long_id, Outcome.VERIFIED, [], "r", topic="t", partition=0, offset=0, now=0.0)
    assert len(body) < 1000 and orjson.loads(body)["id"] == routing.receipt_key(long_id).decode()
    assert routing.receipt_key("evt-1") == b"evt-1"


def test_record_size_is_never_below_aiokafkas_estimate() -> None:
    """The agents' size check is an upper bound of what aiokafka puts on the wire for one record."""
    for key, value, headers in [(None, None, []), (b"k", b"v" * 1_048_400, []),
                                (b"k" * 300, b"x" * 70_000, [("ce_id", b"i" * 100_000), ("h", b"")]),
                                (b"", b"", [(f"h{i}", b"v" * i) for i in range(200)])]:
        assert routing.record_size(key, value, headers) >= \
            DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)


def test_quarantine_headers_with_the_worst_reasons_stay_under_own_headers_max() -> None:
    """byzguard's own quarantine headers (longest topic name, bounded reasons) fit in OWN_HEADERS_MAX."""
    reasons = [Reason(Code.INVARIANT_VIOLATED, "\x01" * 10_000)] * 100
    headers = routing.quarantine_headers([], Outcome.QUARANTINED, reasons, "route-" + "r" * 200, now=1e9,
                                         **_coords())  # type: ignore[arg-type]
    assert routing.record_size(None, None, headers) <= routing.OWN_HEADERS_MAX


def test_a_stub_is_bounded_and_points_at_the_original() -> None:
    """A stub for a 1 MB value with a 100 KB key and huge headers is small, keeps small headers, hashes the key,
    carries the value's SHA-256 and coordinates, and its first reason is output.too_large."""
    value = b"\xff" * 1_048_400
    key = b"k" * 100_000
    headers = [("ce_id", b"i" * 100_000), ("ce_source", b"orders"), ("byzguard_verdict", b"pass")]
    stub_key, stub_value, stub_headers = routing.too_large_stub(
        key, value, headers, [Reason(Code.DECODE_MALFORMED, "not json")], "orders", size=1_048_500,
        limit=1_064_972, now=2e9, **_coords())  # type: ignore[arg-type]
    assert routing.record_size(stub_key, stub_value, stub_headers) <= routing.OWN_HEADERS_MAX
    assert stub_key == b"sha256:" + hashlib.sha256(key).hexdigest().encode()
    body = orjson.loads(stub_value)
    assert body["stub"] == "output.too_large" and body["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert (body["partition"], body["offset"], body["value_size"], body["headers_dropped"]) == (7, 123456789,
                                                                                               1_048_400, 1)
    names = dict(stub_headers)
    assert names["ce_source"] == b"orders" and "ce_id" not in names
    assert names[routing.H_STUB] == b"output.too_large"
    codes = [r["code"] for r in routing.decode_reasons(names[routing.H_REASONS])]
    assert codes == ["output.too_large", "decode.malformed"]


def test_the_review_tools_read_a_stub_and_know_it_cannot_be_approved() -> None:
    """A stub parses as a quarantined record with its original coordinates, is marked a stub, and renders."""
    key, value, headers = routing.too_large_stub(b"acct-1", b"\x00" * 2_000_000, [("ce_type", b"x")], (), "orders",
                                                 size=2_000_100, limit=1_064_972, now=2e9, **_coords())  # type: ignore[arg-type]
    rec = parse_quarantined(key, value, headers, topic="q", partition=7, offset=5, timestamp=2e9)
    assert rec is not None and rec.is_stub
    assert (rec.original_offset, rec.original_partition, rec.codes) == (123456789, 7, ("output.too_large",))
    detail = item_detail(ReviewItem(rec, None, Status.PENDING, None, None))
    assert detail["reasons"][0]["code"] == "output.too_large"
    orjson.dumps(detail)
