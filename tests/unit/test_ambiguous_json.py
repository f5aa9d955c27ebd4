"""JSON whose objects repeat a key means different things to different parsers (orjson and Python keep the last
value, others the first): such an event is refused as decode.ambiguous, at any depth and in every mode."""

from __future__ import annotations

import json

import orjson
import pytest

from byzguard.envelope import DecodeFailure, decode, unambiguous
from byzguard.stamp import Stamper, seed_checksum_event
from byzguard.verdict import Code, Outcome

from .conftest import Harness

NOW = 1_800_000_000.0


def structured(data: bytes, **attrs: str) -> bytes:
    """A structured-mode event around raw `data` text (so the test controls its bytes)."""
    head = {"specversion": "1.0", "id": "e1", "source": "pricing", "type": "price.updated", "subject": "sku-1"}
    head.update(attrs)
    return orjson.dumps(head)[:-1] + b',"data":' + data + b"}"


def binary(value: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A binary-mode record declaring `application/json`, with a correct (bound-form) sha256 of its bytes."""
    s = Stamper("pricing").binary(value, type="price.updated", subject="sku-1", version=1, time=NOW)
    return s.value, s.headers


@pytest.mark.parametrize("data", [
    b'{"price": -1, "price": 5}',
    b'{"price": 5, "currency": "USD", "price": -1}',
    b'{"line": {"sku": "a", "qty": 1, "qty": 100}}',
    b'[1, {"deep": [{"x": {"y": 1, "y": 2}}]}]',
    b'{"price": -1, "price": 5, "note": "\\u003a"}',  # an escaped ':' must not hide the repeated key
    b'{"a\\u003a": 1, "a:": 2}',  # the same key written two ways
])
def test_repeated_key_in_structured_data_is_refused(harness: Harness, data: bytes) -> None:
    """A structured event whose data repeats a key, at any depth, is quarantined as decode.ambiguous."""
    routed = harness.feed(b"sku-1", structured(data), now=NOW)
    assert [r.code for r in routed.decision.reasons] == [Code.DECODE_AMBIGUOUS]
    assert routed.decision.outcome is Outcome.QUARANTINED
    assert "more than once" in routed.decision.reasons[0].detail


def test_repeated_attribute_is_refused() -> None:
    """Two `subject` attributes: which entity is this? Refused before anything reads either."""
    value = b'{"specversion":"1.0","id":"e1","source":"pricing","type":"price.updated","subject":"a",' \
            b'"subject":"b","data":{}}'
    assert decode(None, value, []) == (Code.DECODE_AMBIGUOUS, "value: an object has the key 'subject' more than "
                                       "once; JSON parsers differ on which value counts")


def test_repeated_key_in_a_seed_shape_is_refused(harness: Harness) -> None:
    """The seed's {data, checksum} shape with a repeated key in data is refused, checksum or not."""
    good = seed_checksum_event({"price": 5, "currency": "USD"})
    bad = good.replace(b'"price":5', b'"price":-1,"price":5')
    assert bad != good
    assert [r.code for r in harness.feed(b"sku-9", bad, [("ce_source", b"pricing")], now=NOW).decision.reasons] \
        == [Code.DECODE_AMBIGUOUS]


def test_repeated_key_in_binary_json_data_is_refused(harness: Harness) -> None:
    """Binary-mode data declared application/json with a repeated key is refused, although its checksum
    matches and whether or not a rule reads it."""
    value, headers = binary(b'{"price": -1, "price": 5, "currency": "USD"}')
    routed = harness.feed(b"sku-1", value, headers, now=NOW)
    assert [r.code for r in routed.decision.reasons] == [Code.DECODE_AMBIGUOUS]
    assert routed.decision.outcome is Outcome.QUARANTINED


@pytest.mark.parametrize("data", [
    b'{"price": 5, "lastUpdated": "2026-11-30T09:00:00Z", "note": "a:b::c"}',
    b'{"k\\u003a": "\\u003a\\u003A", "url": "http://x/"}',
    b'{"a": {"price": 1}, "b": {"price": 1}, "c": [{"price": 1}, {"price": 2}]}',
    b'{"text": "\\\\u003a is an escape, written out"}',
    b'{}',
    b'[]',
])
def test_clean_json_with_colons_and_escapes_passes(data: bytes) -> None:
    """Colons in strings, escaped colons and equal keys in different objects are not ambiguity."""
    unambiguous(data, orjson.loads(data), "data")


def test_the_exact_check_agrees_with_json_on_random_documents() -> None:
    """On generated documents with and without repeated keys, the cheap condition plus the exact check refuse
    exactly those that json's object_pairs_hook finds a repeated key in."""
    import random
    rng = random.Random(7)
    words = ["a", "b", "c", ":", "a:", "\\u003a", "x\\u003ay", "\\\\u003a"]

    def doc(depth: int) -> str:
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(['1', '"s:t"', 'null', '"\\u003a"', f'"{rng.choice(words)}"'])
        if rng.random() < 0.3:
            return "[" + ",".join(doc(depth - 1) for _ in range(rng.randrange(3))) + "]"
        keys = [rng.choice(words) for _ in range(rng.randrange(4))]
        return "{" + ",".join(f'"{k}":{doc(depth - 1)}' for k in keys) + "}"

    def repeated(text: bytes) -> bool:
        def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
            if len({k for k, _ in pairs}) != len(pairs):
                raise KeyError
            return dict(pairs)
        try:
            json.loads(text, object_pairs_hook=hook)
        except KeyError:
            return True
        return False

    seen = {True: 0, False: 0}
    for _ in range(3000):
        text = doc(4).encode()
        expected = repeated(text)
        seen[expected] += 1
        try:
            unambiguous(text, orjson.loads(text), "data")
            refused = False
        except DecodeFailure as failure:
            assert failure.code is Code.DECODE_AMBIGUOUS
            refused = True
        assert refused == expected, text
    assert min(seen.values()) > 100, seen


def test_json_nested_deeper_than_orjson_writes_is_still_checked() -> None:
    """Data nested 400 deep (orjson reads it but will not write it back) passes clean and is refused with a
    repeat at the bottom."""
    clean = b'{"a":' * 400 + b'{"x":1}' + b"}" * 400
    unambiguous(clean, orjson.loads(clean), "data")
    with pytest.raises(DecodeFailure) as err:
        repeated = b'{"a":' * 400 + b'{"x":1,"x":2}' + b"}" * 400
        unambiguous(repeated, orjson.loads(repeated), "data")
    assert err.value.code is Code.DECODE_AMBIGUOUS


def test_a_header_repeated_with_two_values_is_refused() -> None:
    """Two `ce_subject` headers with different values: readers that take the first and the last disagree."""
    value, headers = binary(b'{"price": 5}')
    assert decode(b"sku-1", value, [*headers, ("ce_subject", b"sku-2")]) == (
        Code.DECODE_AMBIGUOUS, "header 'ce_subject' is repeated with different values")


def test_a_header_repeated_with_the_same_value_is_not_ambiguous() -> None:
    """The same attribute twice with one value means one thing, and so does a repeated header byzguard does not read."""
    value, headers = binary(b'{"price": 5}')
    subject = dict(headers)["ce_subject"]
    decoded = decode(b"sku-1", value, [*headers, ("ce_subject", subject), ("x-trace", b"1"), ("x-trace", b"2")])
    assert not isinstance(decoded, tuple)
    assert decoded.subject == "sku-1"
