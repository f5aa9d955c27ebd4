"""Decoding never raises: any bytes and headers give an envelope or a decode code."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from byzguard.envelope import Envelope, decode
from byzguard.stamp import Stamper
from byzguard.verdict import Code

HEADER_NAMES = st.sampled_from(["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject",
                                "ce_entityversion", "ce_lamporttime", "ce_vectorclock", "ce_checksumalg",
                                "ce_checksum", "ce_keyid", "content-type", "other"])


@settings(max_examples=600, deadline=None)
@given(key=st.one_of(st.none(), st.binary(max_size=20)), value=st.one_of(st.none(), st.binary(max_size=200)),
       headers=st.lists(st.tuples(HEADER_NAMES, st.binary(max_size=30)), max_size=8))
def test_random_records_never_raise(key: bytes | None, value: bytes | None,
                                    headers: list[tuple[str, bytes]]) -> None:
    """Random keys, values and ce_* headers decode to an Envelope or a decode code, never an exception."""
    result = decode(key, value, headers)
    assert isinstance(result, Envelope) or result[0].value.startswith("decode.")


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(min_value=0, max_value=400), structured=st.booleans())
def test_truncated_events_never_raise(cut: int, structured: bool) -> None:
    """Every prefix of a valid event decodes or is refused with a decode code."""
    s = Stamper("pricing")
    make = s.structured if structured else s.binary
    stamped = make({"price": 49.99, "nested": {"a": [1, 2, 3]}}, type="t", subject="e", version=1, time=1.0)
    result = decode(stamped.key, stamped.value[:cut], stamped.headers)
    assert isinstance(result, Envelope) or result[0].value.startswith("decode.")


def test_bad_header_values_name_the_header() -> None:
    """An unparsable header is decode.malformed with the header named in the detail."""
    base = [("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"s"), ("ce_type", b"t")]
    for name, raw in (("ce_time", b"yesterday"), ("ce_lamporttime", b"x"), ("ce_vectorclock", b"a=1,a=2"),
                      ("ce_id", b"\xff\xfe")):
        result = decode(b"k", b"{}", [*[(k, v) for k, v in base if k != name], (name, raw)])
        assert isinstance(result, tuple)
        assert result[0] is Code.DECODE_MALFORMED and name in result[1]


def test_seed_shapes_map_their_attributes() -> None:
    """The seed's versioned and Lamport shapes carry version, time, source and Lamport time through."""
    env = decode(b"sku-1", b'{"data":{"p":1},"version":3,"updatedAt":"2026-01-01T00:00:00Z","source":"pricing"}',
                 [], default_type="price.updated")
    assert isinstance(env, Envelope)
    assert (env.version, env.source, env.type, env.time) == (3, "pricing", "price.updated", 1767225600.0)
    env2 = decode(b"o-1", b'{"payload":{"x":1},"logicalTimestamp":9,"sourceService":"orders"}', [],
                  default_type="order.confirmed")
    assert isinstance(env2, Envelope)
    assert (env2.lamport, env2.source, env2.data()) == (9, "orders", {"x": 1})
