"""The structured fast path builds exactly the envelope the strict path builds, or leaves the event to it."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from byzguard.clocks import VectorClock
from byzguard.envelope import _VCLOCKS, Envelope, _decode_structured, _fast_structured, decode, decode_many
from byzguard.errors import ClockError
from byzguard.integrity import BOUND, form_input
from byzguard.stamp import Stamper

_FIELDS = ("id", "source", "type", "subject", "mode", "covered", "content_hash", "time", "version", "lamport",
           "instance", "vclock", "checksum", "form", "attrs", "obj", "refused")

# What an attribute may be replaced with: the types JSON has, the forms the strict path reads otherwise
# (numbers as text, epoch milliseconds, a clock object) and values it refuses.
SAMPLES: list[Any] = [
    ..., None, True, False, 0, 1, -1, 2**63 - 1, 2**63, 1.5, 1e300, "", "1.0", "7", "-1", "x y", "\u0663",
    "2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "1700000000000", "a=1,b=2", "a=0", "a=1,a=2", "not a time",
    "sku-1", "hmac-sha256", "sha256", "bound", "value-only", "application/json", {}, {"a": 1, "b": 2}, {"a": -1},
    [], [1, 2], "x" * 70, "a\nb", "k\n",
]
ODD_VALUES = st.one_of(st.sampled_from(SAMPLES), st.integers(min_value=-3, max_value=2**63),
                       st.floats(allow_nan=False), st.text(max_size=5))
NAMES = ["specversion", "id", "source", "type", "subject", "time", "entityversion", "lamporttime", "lamportinstance",
         "vectorclock", "checksumform", "datacontenttype", "checksumalg", "checksum", "keyid", "data", "data_base64"]
ATTRIBUTES = st.sampled_from(NAMES)


def _event() -> dict[str, Any]:
    stamped = Stamper("pricing", instance="i-1").structured(
        {"price": 10.5, "n": [1, 2.0, "x"]}, type="price.updated", subject="sku-1", version=3, time=1.5e9,
        vclock=None)
    obj: dict[str, Any] = orjson.loads(stamped.value)
    obj["vectorclock"] = "pricing=3"
    return obj


def _agree(obj: dict[str, Any], key: bytes | None, default_type: str, default_source: str | None) -> None:
    value = orjson.dumps(obj)
    fast = _fast_structured(key, obj, default_type, default_source, b"\\" in value)  # as decode calls it
    # The line feed test is skipped only for a text without a backslash: counting the lines gives the same.
    assert _envelope_fields(_fast_structured(key, obj, default_type, default_source)) == _envelope_fields(fast)
    try:
        strict: Envelope | None = _decode_structured(key, value, obj, {}, default_type, default_source)
    except Exception:  # a refusal (DecodeFailure) of what the fast path must have left alone
        strict = None
    if fast is not None:
        assert strict is not None
        _same(fast, strict)


def _envelope_fields(env: Envelope | None) -> tuple[Any, ...] | None:
    return None if env is None else (*(getattr(env, name) for name in _FIELDS), env.bound)


def _same(a: Envelope, b: Envelope) -> None:
    for name in _FIELDS:
        assert getattr(a, name) == getattr(b, name), name
    assert a.data() == b.data()
    # The fast path builds the bound form's signature base from the texts; the strict path's envelope has it
    # built from its attributes by bound_base.
    assert b.bound is None
    assert form_input(BOUND, a) == form_input(BOUND, b)


def test_fast_path_agrees_for_every_single_change() -> None:
    """Each attribute left out or set to each sample value: the fast path gives None or the strict envelope."""
    for name in NAMES:
        for sample in SAMPLES:
            for key, default_type, default_source in ((b"sku-1", "", None), (None, "t", "s"), (b"\xff", "", "")):
                obj = _event()
                if sample is ...:
                    obj.pop(name, None)
                else:
                    obj[name] = sample
                _agree(obj, key, default_type, default_source)


@settings(max_examples=400, deadline=None)
@given(changes=st.dictionaries(ATTRIBUTES, st.one_of(ODD_VALUES, st.just(...)), max_size=3),
       key=st.sampled_from([b"sku-1", None, b"other", b"", b"\xff"]),
       default_type=st.sampled_from(["", "t"]), default_source=st.sampled_from([None, "", "s"]))
def test_fast_path_agrees_with_the_strict_path(changes: dict[str, Any], key: bytes | None, default_type: str,
                                               default_source: str | None) -> None:
    """For any attribute values (or attributes left out), the fast path gives None or the strict path's envelope."""
    obj = _event()
    for name, value in changes.items():
        if value is ...:
            obj.pop(name, None)
        else:
            obj[name] = value
    _agree(obj, key, default_type, default_source)


def test_a_stamped_event_takes_the_fast_path() -> None:
    """The events producers stamp are read by the fast path (what the hot path is measured on)."""
    obj = _event()
    fast = _fast_structured(b"sku-1", obj, "", None)
    assert fast is not None and fast.bound is not None  # and its signature base built on the way
    strict = _decode_structured(b"sku-1", orjson.dumps(obj), obj, {}, "", None)
    _same(fast, strict)
    decoded = decode(b"sku-1", orjson.dumps(obj), [("content-type", b"application/cloudevents+json")])
    assert isinstance(decoded, Envelope)
    _same(decoded, strict)


@settings(max_examples=300, deadline=None)
@given(order=st.permutations(NAMES[:-1]), drop=st.sets(st.sampled_from(NAMES[:-1]), max_size=4),
       extra=st.sampled_from([None, ("x-extension", "1"), ("keyid", None), ("keyid", "k-1"), ("checksumalg", None)]),
       texts=st.tuples(st.sampled_from(["i-1", "i 2", "i\n3", "é"]), st.sampled_from(["pricing=3", "a=1,b=2", "a=0",
                                                                                   "p=1\n", "a=1,a=2", ""])))
def test_fast_path_agrees_in_any_member_order(order: list[str], drop: set[str], extra: tuple[str, Any] | None,
                                              texts: tuple[str, str]) -> None:
    """Members in any order, some left out, an extension member or a null, a key id (with every attribute: the
    bound form's head in one step), line feeds in the texts the bound form covers: the fast path gives None or
    the strict path's envelope and signature base."""
    event = _event()
    event["lamportinstance"], event["vectorclock"] = texts
    obj = {name: event[name] for name in order if name in event and name not in drop}
    if extra is not None:
        obj[extra[0]] = extra[1]
    _agree(obj, b"sku-1", "", None)


def test_the_clock_memo_holds_only_clocks_that_parse() -> None:
    """A vector clock text read once is served from the memo as the same clock; a malformed one is refused
    every time and never kept."""
    obj = _event()
    obj["vectorclock"] = "memo-node=41"
    first = _fast_structured(b"sku-1", obj, "", None)
    second = _fast_structured(b"sku-1", obj, "", None)
    assert first is not None and second is not None
    assert first.vclock is second.vclock and first.vclock == VectorClock({"memo-node": 41})
    obj["vectorclock"] = "memo-node=041"
    assert _fast_structured(b"sku-1", obj, "", None) is None
    assert "memo-node=041" not in _VCLOCKS
    with pytest.raises(ClockError):
        VectorClock.from_header("memo-node=041")


@pytest.mark.parametrize(("key", "default_type", "default_source", "drop"), [
    (b"sku\n1", "", None, "subject"), (b"sku-1", "t\nu", None, "type"), (b"sku-1", "", "s\nt", "source"),
])
def test_a_line_feed_from_outside_the_text_is_counted(key: bytes, default_type: str, default_source: str | None,
                                                      drop: str) -> None:
    """A text without a backslash holds no line feed, but the key and the route's defaults are not from it: a line
    feed there still keeps the fast path from building the bound form's signature base by the texts."""
    obj = _event()
    obj.pop(drop)
    value = orjson.dumps(obj)
    assert b"\\" not in value
    fast = _fast_structured(key, obj, default_type, default_source, False)
    assert fast is None or fast.bound is None
    _agree(obj, key, default_type, default_source)
    decoded = decode(key, value, [], default_type, default_source)
    assert not isinstance(decoded, Envelope) or decoded.bound is None


def _vector_records() -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]], str | None]]:
    """The records of the envelope vectors (tests/vectors/envelope.json): every shape, algorithm and failure."""
    vectors = orjson.loads((Path(__file__).parents[1] / "vectors" / "envelope.json").read_bytes())
    out: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]], str | None]] = []
    for case in vectors["cases"]:
        rec = case["record"]
        value = rec["value"]
        raw = value["text"].encode() if "text" in value else base64.b64decode(value["base64"])
        out.append((None if rec["key"] is None else rec["key"].encode(), raw,
                    [(k, v.encode()) for k, v in rec["headers"]], None))
    return out


VECTOR_RECORDS = _vector_records()
_CE = [("content-type", b"application/cloudevents+json")]


def _decoded_view(result: Envelope | tuple[Any, str]) -> Any:
    return _envelope_fields(result) if isinstance(result, Envelope) else result


@settings(max_examples=300, deadline=None)
@given(changes=st.lists(st.dictionaries(ATTRIBUTES, st.one_of(ODD_VALUES, st.just(...)), max_size=2), max_size=6),
       picks=st.lists(st.integers(0, len(VECTOR_RECORDS) - 1), max_size=6),
       odd=st.lists(st.sampled_from([b"", b"[1]", b"{not json", b'{"a":1,"a":2}', b'{"a": 1}', b"\xff", b"null"]),
                    max_size=3),
       headers=st.sampled_from([_CE, [], [("ce_specversion", b"1.0")], [("CE_ID", b"1"), ("ce_id", b"2")]]),
       default_type=st.sampled_from(["", "t"]), default_source=st.sampled_from([None, "s"]),
       seed=st.integers(0, 1000))
def test_decode_many_is_decode_of_each(changes: list[dict[str, Any]], picks: list[int], odd: list[bytes],
                                       headers: list[tuple[str, bytes]], default_type: str,
                                       default_source: str | None, seed: int) -> None:
    """decode_many (decode's steps as passes over the records, decode itself for whatever leaves them) gives each
    record what decode gives it: stamped events changed anyhow (fast path or not), the envelope vectors (binary,
    structured, seed shapes, failures), values that are not JSON objects or not written back byte for byte (a
    member twice, spaces), a
    ce_specversion header, a repeated attribute header; in any order."""
    records: list[tuple[bytes | None, bytes | None, Any, str | None]] = []
    for change in changes:
        obj = _event()
        for name, value in change.items():
            if value is ...:
                obj.pop(name, None)
            else:
                obj[name] = value
        text = orjson.dumps(obj)
        records.append((b"sku-1", text, headers, default_source))
        # Not written back byte for byte: an ambiguous text (a member twice) and a merely spaced one.
        records.append((b"sku-1", b'{"id":"twice",' + text[1:], headers, default_source))
        records.append((b"sku-1", orjson.dumps(obj, option=orjson.OPT_INDENT_2), headers, default_source))
    records += [VECTOR_RECORDS[i] for i in picks]
    records += [(b"k", value, headers, default_source) for value in odd]
    random.Random(seed).shuffle(records)
    want = [_decoded_view(decode(k, v, h, default_type, s)) for k, v, h, s in records]
    assert [_decoded_view(got) for got in decode_many(records, default_type)] == want


def test_decode_many_takes_the_passes_for_stamped_events() -> None:
    """Stamped events come out of the passes (not decode's fallback) with decode's envelope and signature base."""
    records = [(b"sku-1", orjson.dumps(_event()), _CE, None)] * 3
    got = decode_many(records)
    assert all(isinstance(env, Envelope) and env.bound is not None for env in got)
    assert [_decoded_view(env) for env in got] == [_decoded_view(decode(*r[:3])) for r in records]
