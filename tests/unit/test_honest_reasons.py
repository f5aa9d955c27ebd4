"""Reasons say what is wrong with the event in its own terms: declared JSON that is not JSON is malformed, not a
rule's error; no reason shows Python's None; quoted input is bounded."""

from __future__ import annotations

import hashlib

import orjson

from byzguard.envelope import decode
from byzguard.integrity import HMAC_SHA256, bound_base
from byzguard.stamp import Stamper
from byzguard.verdict import QUOTE_LIMIT, Code, Outcome, quote

from .conftest import PRICING_KEY, Harness

NOW = 1_800_000_000.0
NO_RULES = """
routes:
  - name: main
    inputs: [in]
    verified_topic: out
    quarantine_topic: bad
    types:
      price.updated: {}
"""


def not_json(value: bytes, content_type: bytes = b"application/json") -> tuple[bytes, list[tuple[str, bytes]]]:
    """A binary-mode record declaring `content_type` whose bytes are `value`, with a correct (bound-form) sha256."""
    s = Stamper("pricing").binary(value, type="price.updated", subject="sku-1", version=1, time=NOW)
    headers = [(k, content_type if k == "content-type" else v) for k, v in s.headers]
    h = dict(headers)
    base = bound_base(h["ce_id"], h["ce_source"], h["ce_type"], h["ce_subject"], h, h["ce_checksumalg"], None, value)
    assert base is not None
    return value, [(k, hashlib.sha256(base).hexdigest().encode() if k == "ce_checksum" else v) for k, v in headers]


def test_declared_json_that_is_not_json_is_malformed_with_or_without_rules(harness: Harness) -> None:
    """Bytes declared application/json that do not parse are decode.malformed, on a type without rules (it
    used to pass) and on one with rules (it used to be invariant.error)."""
    value, headers = not_json(b"price=5;currency=USD")
    for h in (Harness(NO_RULES), harness):
        routed = h.feed(b"sku-1", value, headers, now=NOW)
        assert routed.decision.outcome is Outcome.QUARANTINED
        assert [r.code for r in routed.decision.reasons] == [Code.DECODE_MALFORMED]
        assert "declared 'application/json' but is not JSON" in routed.decision.reasons[0].detail
        assert not h.entities


def test_json_media_types_with_parameters_and_suffixes_are_json(harness: Harness) -> None:
    """`application/json; charset=utf-8` and `application/vnd.x+json` declare JSON too; other types do not."""
    for content_type in (b"application/json; charset=utf-8", b"Application/JSON", b"application/vnd.prices+json"):
        value, headers = not_json(b"<price>5</price>", content_type)
        assert [r.code for r in Harness(NO_RULES).feed(b"sku-1", value, headers, now=NOW).decision.reasons] == [
            Code.DECODE_MALFORMED], content_type
    value, headers = not_json(b"<price>5</price>", b"application/xml")
    assert Harness(NO_RULES).feed(b"sku-1", value, headers, now=NOW).decision.outcome is Outcome.VERIFIED


def test_corruption_of_declared_json_is_still_an_integrity_failure(harness: Harness) -> None:
    """A bit flip that breaks the JSON of a checksummed value is integrity.mismatch (the cause), not malformed."""
    s = Stamper("pricing").binary({"price": 5, "currency": "USD"}, type="price.updated", subject="sku-1",
                                  version=1, time=NOW)
    broken = s.value.replace(b'{"', b'["', 1)
    assert [r.code for r in harness.feed(s.key, broken, s.headers, now=NOW).decision.reasons] == [
        Code.INTEGRITY_MISMATCH]


def test_structured_event_without_specversion_says_so() -> None:
    """A structured event missing `specversion` is reported as such, not as having no event type."""
    value = orjson.dumps({"id": "e1", "source": "pricing", "type": "price.updated", "subject": "sku-1",
                          "data": {"price": 5}, "checksum": "00"})
    code, detail = decode(b"sku-1", value, [])  # type: ignore[misc]
    assert code is Code.DECODE_MALFORMED
    assert "specversion" in detail and "no event type" not in detail
    assert "id, type, subject" in detail
    typeless = orjson.dumps({"id": "e1", "source": "pricing", "data": {"price": 5}, "checksum": "00"})
    code, detail = decode(b"sku-1", typeless, [], default_type="price.updated")  # type: ignore[misc]
    assert (code, "specversion" in detail) == (Code.DECODE_MALFORMED, True)


def test_no_reason_shows_python_none(harness: Harness) -> None:
    """A MAC without a key id, on a type that requires listed keys, is not 'key None may not sign'."""
    signed = Stamper("pricing", algorithm=HMAC_SHA256, key=PRICING_KEY).binary(
        {"x": 1}, type="signed.thing", subject="t", version=1, time=NOW)
    headers = [(k, v) for k, v in signed.headers if k != "ce_keyid"]
    routed = harness.feed(signed.key, signed.value, headers, now=NOW)
    details = [r.detail for r in routed.decision.reasons]
    assert routed.decision.outcome is Outcome.QUARANTINED and details
    assert not any("None" in d for d in details), details
    assert any("without a key id" in d for d in details), details


def test_a_huge_attribute_is_not_quoted_whole(harness: Harness) -> None:
    """A 100 KB source or id is quoted in at most QUOTE_LIMIT characters, ending in an ellipsis."""
    huge = "x" * 100_000
    s = Stamper(huge).binary({"price": 5}, type="price.updated", subject="sku-1", version=1, time=NOW)
    routed = harness.feed(s.key, s.value, s.headers, now=NOW)
    assert [r.code for r in routed.decision.reasons] == [Code.SOURCE_NOT_ALLOWED]
    assert len(routed.decision.reasons[0].detail) < 2 * QUOTE_LIMIT
    assert "…" in routed.decision.reasons[0].detail
    value = orjson.dumps({"specversion": "1.0", "id": "e", "source": "s", "type": "t", "time": huge, "data": {}})
    code, detail = decode(None, value, [], default_type="t")  # type: ignore[misc]
    assert code is Code.DECODE_MALFORMED and len(detail) < 2 * QUOTE_LIMIT


def test_quote_bounds_every_kind_of_value() -> None:
    """quote() is repr() for short values, cut with an ellipsis for long ones, and `null` for None."""
    assert quote("sku-1") == "'sku-1'"
    assert quote(None) == "null"
    assert quote(b"\x00") == "b'\\x00'"
    for value in ("y" * 10_000, b"y" * 10_000, ["y" * 50] * 50):
        text = quote(value)
        assert len(text) == QUOTE_LIMIT and text.endswith("…")


def test_declared_json_that_is_not_json_keeps_the_warnings_found_before() -> None:
    """On a route that passes unlisted types with a warning, false JSON is quarantined (whatever the policy)
    with both reasons: the type warning and decode.malformed."""
    h = Harness(NO_RULES.replace("    types:\n      price.updated: {}\n", "    unlisted_types: warn\n    "
                                 "policy: fail_open\n"))
    value, headers = not_json(b"{oops")
    routed = h.feed(b"sku-1", value, headers, now=NOW)
    assert routed.decision.outcome is Outcome.QUARANTINED
    assert [(r.code, r.severity.value) for r in routed.decision.reasons] == [
        (Code.TYPE_UNLISTED, "warn"), (Code.DECODE_MALFORMED, "reject")]
