"""Integrity forms: the bound form binds the attributes to the data, lenient forms are opt-in per source
and say so, and a checksum made in a non-canonical form is named, not reported as corruption."""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import orjson
import pytest

from byzguard import config as guard_config
from byzguard import integrity
from byzguard.envelope import Envelope, decode
from byzguard.errors import ConfigError
from byzguard.integrity import (
    BOUND,
    DEFAULT_FORMS,
    FORMS,
    HMAC_SHA256,
    SHA256,
    VALUE_ONLY,
    KeyRing,
    bound_base,
    check_integrity,
    digest,
)
from byzguard.jcs import canonicalize, js_sorted, js_stringify
from byzguard.stamp import Stamped, Stamper, seed_checksum_event
from byzguard.verdict import Code, Outcome, Severity
from byzguard.verify_again import verify_again

from .conftest import BASE_CONFIG, PRICING_KEY, Harness

NOW = 1_800_000_000.0
PRICE = {"price": 49.99, "currency": "USD"}
# pricing may only use the bound form; shop (a JavaScript service) is declared to use two lenient forms,
# and writes the topic in.shop, whose records name no source.
LENIENT = BASE_CONFIG.replace("sources: [pricing, orders]", "sources: [pricing, orders, shop]").replace(
    "inputs: [in]", "inputs: [in, {topic: in.shop, source: shop}]") + """
sources:
  shop: {forms: [value-only, js-sorted]}
"""


def codes(routed: Any) -> list[str]:
    """The reason codes of a routed record."""
    return [r.code.value for r in routed.decision.reasons]


def signed(version: int = 3, subject: str = "sku-1", **kw: Any) -> Stamped:
    """A bound-form binary record of pricing, MAC'd with pricing's key."""
    return Stamper("pricing", algorithm=HMAC_SHA256, key=PRICING_KEY, lamport=10).binary(
        PRICE, type="price.updated", subject=subject, version=version, time=NOW, **kw)


def changed(headers: list[tuple[str, bytes]], name: str, value: bytes | None) -> list[tuple[str, bytes]]:
    """The headers with one replaced (or removed, for None)."""
    out = [(k, value if k == name else v) for k, v in headers]
    return [(k, v) for k, v in out if v is not None]


def feed(h: Harness, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]], topic: str = "in") -> Any:
    """Process one record read from `topic`."""
    from byzguard.guard import RecordIn
    h.offset += 1
    return h.apply(h.guard.process(RecordIn(key, value, headers, topic, 0, h.offset, NOW), h.route, h.state,
                                   now=NOW)).first


# --- the bound form ------------------------------------------------------------------------------------

def test_bound_record_verifies_and_declares_its_form(harness: Harness) -> None:
    """A Stamper record carries ce_checksumform: bound, and its MAC verifies with no reason."""
    s = signed()
    assert dict(s.headers)["ce_checksumform"] == b"bound"
    routed = harness.feed(s.key, s.value, s.headers, now=NOW)
    assert routed.decision.outcome is Outcome.VERIFIED and codes(routed) == []


def test_signed_record_replayed_under_another_subject_is_a_bad_mac(harness: Harness) -> None:
    """A captured signed record re-sent as another entity (record key and ce_subject) fails its MAC."""
    s = signed()
    routed = harness.feed(b"sku-2", s.value, changed(s.headers, "ce_subject", b"sku-2"), now=NOW)
    assert codes(routed) == ["integrity.bad_mac"] and routed.decision.outcome is Outcome.QUARANTINED


def test_signed_record_without_subject_replayed_under_another_key_is_a_bad_mac(harness: Harness) -> None:
    """The subject line is the entity id the guard uses: with no ce_subject, the record key is bound."""
    s = signed()
    headers = changed(s.headers, "ce_subject", None)
    assert harness.feed(s.key, s.value, headers, now=NOW).decision.outcome is Outcome.VERIFIED
    assert codes(harness.feed(b"sku-2", s.value, headers, now=NOW)) == ["integrity.bad_mac"]


def test_signed_record_replayed_as_a_newer_version_is_a_bad_mac(harness: Harness) -> None:
    """A captured signed record re-sent with a higher ce_entityversion cannot become the last-known-good."""
    stamper = Stamper("pricing", algorithm=HMAC_SHA256, key=PRICING_KEY)
    s = stamper.binary(PRICE, type="price.updated", subject="sku-1", version=3, time=NOW)
    assert harness.feed(s.key, s.value, s.headers, now=NOW).decision.outcome is Outcome.VERIFIED
    newer = harness.feed(s.key, s.value, changed(s.headers, "ce_entityversion", b"4"), now=NOW)
    assert codes(newer) == ["integrity.bad_mac"]
    honest = stamper.binary(PRICE, type="price.updated", subject="sku-1", version=4, time=NOW)
    assert harness.feed(honest.key, honest.value, honest.headers, now=NOW).decision.outcome is Outcome.VERIFIED


@pytest.mark.parametrize("name, value", [
    ("ce_id", b"another-id"), ("ce_type", b"signed.thing"), ("ce_time", b"2027-01-15T07:59:59.000Z"),
    ("ce_entityversion", b"33"), ("ce_lamporttime", b"99"), ("ce_vectorclock", b"pricing=9"),
    ("content-type", b"text/plain"), ("ce_checksumalg", b"xxh3-128"), ("ce_entityversion", None),
    ("ce_time", None), ("ce_lamporttime", None), ("content-type", None),
])
def test_every_covered_attribute_changed_or_removed_in_transit_fails(harness: Harness, name: str,
                                                                      value: bytes | None) -> None:
    """Changing or stripping any covered attribute of a sha256 record is an integrity.mismatch."""
    s = Stamper("pricing", lamport=10).binary(PRICE, type="price.updated", subject="sku-1", version=3, time=NOW,
                                              vclock=_clock())
    assert harness.feed(s.key, s.value, s.headers, now=NOW).decision.outcome is Outcome.VERIFIED
    routed = harness.feed(s.key, s.value, changed(s.headers, name, value), now=NOW)
    assert codes(routed)[-1] == "integrity.mismatch", codes(routed)


def _clock() -> Any:
    from byzguard.clocks import VectorClock
    return VectorClock({"pricing": 1})


def test_structured_bound_record_replayed_under_another_subject_is_a_bad_mac(harness: Harness) -> None:
    """Structured mode binds its attributes the same way."""
    s = Stamper("pricing", algorithm=HMAC_SHA256, key=PRICING_KEY).structured(
        PRICE, type="price.updated", subject="sku-1", version=1, time=NOW)
    assert harness.feed(s.key, s.value, s.headers, now=NOW).decision.outcome is Outcome.VERIFIED
    event = orjson.loads(s.value)
    event["subject"] = "sku-2"
    event["entityversion"] = 2
    assert codes(harness.feed(b"sku-2", orjson.dumps(event), s.headers, now=NOW)) == ["integrity.bad_mac"]


def test_absent_and_empty_components_make_different_bases() -> None:
    """An absent optional component leaves out its line; present and empty is a line: never the same base."""
    absent = bound_base(b"e", b"s", b"t", b"x", {}, b"sha256", None, b"{}")
    empty = bound_base(b"e", b"s", b"t", b"x", {"content-type": b""}, b"sha256", None, b"{}")
    assert absent == b"checksumform: bound\nid: e\nsource: s\ntype: t\nsubject: x\nchecksumalg: sha256\ndata: {}"
    assert empty is not None and empty != absent and b"\ndatacontenttype: \n" in empty


@pytest.mark.parametrize("where", ["subject", "attr", "keyid"])
def test_a_line_feed_in_a_component_has_no_base(where: str) -> None:
    """A component holding a line feed could forge another line: the bound form refuses to cover it."""
    args: dict[str, Any] = {"id": b"e", "source": b"s", "type": b"t", "subject": b"x", "attrs": {},
                            "algorithm": b"sha256", "key_id": None, "data": b"{}"}
    if where == "subject":
        args["subject"] = b"x\nentityversion: 9"
    elif where == "attr":
        args["attrs"] = {"ce_time": b"2027\nentityversion: 9"}
    else:
        args["key_id"] = b"k\nx"
    assert bound_base(**args) is None
    assert bound_base(**{**args, "subject": b"x", "attrs": {}, "key_id": None, "data": b"\n\n"}) is not None


def test_line_feed_in_a_header_is_a_mismatch_not_a_crash(harness: Harness) -> None:
    """A record whose covered header holds a line feed fails integrity (the base is undefined)."""
    s = Stamper("pricing").binary(PRICE, type="price.updated", subject="sku-1", version=1, time=NOW)
    routed = harness.feed(s.key, s.value, changed(s.headers, "content-type", b"application/json\nx: y"), now=NOW)
    assert codes(routed) == ["integrity.mismatch"]
    with pytest.raises(ValueError, match="line feed"):
        Stamper("pricing").binary(PRICE, type="price.updated", subject="sku\n1")


def test_unknown_form_is_an_unknown_algorithm(harness: Harness) -> None:
    """A ce_checksumform that names no form is refused as integrity.unknown_algorithm, naming the forms."""
    s = signed()
    routed = harness.feed(s.key, s.value, changed(s.headers, "ce_checksumform", b"bound-v9"), now=NOW)
    assert codes(routed) == ["integrity.unknown_algorithm"] and "bound-v9" in routed.decision.reasons[0].detail


# --- the value-only form: opt-in per source --------------------------------------------------------------

def test_value_only_form_of_a_source_not_declared_is_refused_as_unbound(harness: Harness) -> None:
    """A first-release record (checksum over the value only) from pricing, which may use only `bound`."""
    old = Stamper("pricing", form=VALUE_ONLY).binary(PRICE, type="price.updated", subject="sku-1", version=1)
    assert "ce_checksumform" not in dict(old.headers)
    routed = harness.feed(old.key, old.value, old.headers, now=NOW)
    assert codes(routed) == ["integrity.unbound"] and routed.decision.outcome is Outcome.QUARANTINED
    assert "forms: [value-only]" in routed.decision.reasons[0].detail


def test_value_only_form_of_a_declared_source_passes_with_a_warning() -> None:
    """The same form from shop, declared to use it, is verified (state advances) with integrity.legacy_form."""
    h = Harness(LENIENT)
    old = Stamper("shop", form=VALUE_ONLY).binary(PRICE, type="price.updated", subject="sku-1", version=1)
    routed = h.feed(old.key, old.value, old.headers, now=NOW)
    assert routed.decision.outcome is Outcome.WARNED and codes(routed) == ["integrity.legacy_form"]
    assert routed.decision.reasons[0].severity is Severity.WARN and routed.decision.entity is not None
    corrupted = h.feed(old.key, old.value.replace(b"49.99", b"49.98"), old.headers, now=NOW)
    assert codes(corrupted) == ["integrity.mismatch"]


def test_legacy_form_can_be_made_a_reject_by_config() -> None:
    """codes: {integrity.legacy_form: reject} refuses the lenient forms again without removing the declaration."""
    h = Harness(LENIENT.replace("  max_age: 24h", "  max_age: 24h\n  codes: {integrity.legacy_form: reject}"))
    old = Stamper("shop", form=VALUE_ONLY).binary(PRICE, type="price.updated", subject="sku-1", version=1)
    assert h.feed(old.key, old.value, old.headers, now=NOW).decision.outcome is Outcome.QUARANTINED


def test_a_replayed_value_only_record_of_a_declared_source_still_warns() -> None:
    """What opting in costs, visibly: a value-only record replayed under another subject is not caught by
    integrity, and every such record carries the legacy-form warning."""
    h = Harness(LENIENT)
    old = Stamper("shop", form=VALUE_ONLY).binary(PRICE, type="price.updated", subject="sku-1", version=1)
    routed = h.feed(b"sku-2", old.value, changed(old.headers, "ce_subject", b"sku-2"), now=NOW)
    assert codes(routed) == ["integrity.legacy_form"]


# --- the article's producers -----------------------------------------------------------------------------

def test_articles_record_on_an_undeclared_topic_has_no_source(harness: Harness) -> None:
    """{data, checksum} with no headers, as the article's producer sends it, names no source."""
    routed = harness.feed(b"sku-1", seed_checksum_event(PRICE), [], now=NOW)
    assert codes(routed) == ["decode.malformed"] and "no source" in routed.decision.reasons[0].detail


def test_articles_record_on_a_declared_topic_is_guarded_from_its_first_event() -> None:
    """On an input declared as written by shop, the same record is shop's, verified with the legacy warning."""
    h = Harness(LENIENT)
    routed = feed(h, b"sku-1", seed_checksum_event(PRICE), [], topic="in.shop")
    assert routed.envelope.source == "shop"
    assert routed.decision.outcome is Outcome.WARNED and codes(routed) == ["integrity.legacy_form"]
    bad = feed(h, b"sku-1", seed_checksum_event(PRICE).replace(b"49.99", b"4.999"), [], topic="in.shop")
    assert codes(bad) == ["integrity.mismatch"]


def test_declared_topic_without_a_declared_form_refuses_the_unbound_checksum() -> None:
    """Declaring the topic's source does not by itself accept its data-only checksum."""
    h = Harness(LENIENT.replace("  shop: {forms: [value-only, js-sorted]}", "  shop: {forms: []}"))
    assert codes(feed(h, b"sku-1", seed_checksum_event(PRICE), [], topic="in.shop")) == ["integrity.unbound"]


def test_record_claiming_another_source_on_a_declared_topic_is_not_allowed() -> None:
    """A record on shop's topic that names pricing as its source is refused: the topic has one writer."""
    h = Harness(LENIENT)
    s = Stamper("pricing").binary(PRICE, type="price.updated", subject="sku-1", version=1, time=NOW)
    assert codes(feed(h, s.key, s.value, s.headers, topic="in.shop")) == ["source.not_allowed"]
    assert feed(h, s.key, s.value, s.headers, topic="in").decision.outcome is Outcome.VERIFIED


JS_DATA = {"9": 1.5, "10": 2.5, "currency": "USD", "price": 5}


def test_js_sorted_differs_from_rfc8785_for_integer_like_keys() -> None:
    """The article's canonicalize puts "9" before "10" (JavaScript's own-key order); RFC 8785 does not."""
    assert js_sorted(JS_DATA) == b'{"9":1.5,"10":2.5,"currency":"USD","price":5}'
    assert canonicalize(JS_DATA) == b'{"10":2.5,"9":1.5,"currency":"USD","price":5}'
    assert js_sorted(PRICE) == canonicalize(PRICE)


def _js_record(data: Any) -> bytes:
    return orjson.dumps({"data": data, "checksum": hashlib.sha256(js_sorted(data)).hexdigest()})


def test_js_key_order_checksum_is_named_noncanonical_not_corruption(harness: Harness) -> None:
    """The article's checksum over integer-like keys is integrity.noncanonical, naming the js-sorted form."""
    routed = harness.feed(b"sku-1", _js_record(JS_DATA), [("ce_source", b"pricing")], now=NOW)
    assert codes(routed) == ["integrity.noncanonical"]
    detail = routed.decision.reasons[0].detail
    assert "'js-sorted'" in detail and "forms: [js-sorted]" in detail


def test_js_key_order_checksum_of_a_declared_source_passes_with_a_warning() -> None:
    """shop is declared to use js-sorted: the same record passes, with integrity.legacy_form naming it."""
    h = Harness(LENIENT)
    routed = feed(h, b"sku-1", _js_record(JS_DATA), [], topic="in.shop")
    assert routed.decision.outcome is Outcome.WARNED and codes(routed) == ["integrity.legacy_form"]
    assert "'js-sorted'" in routed.decision.reasons[0].detail


@pytest.mark.parametrize("form, checksum", [
    ("whole-object", lambda obj: hashlib.sha256(canonicalize(obj)).hexdigest()),
    ("js-stringify", lambda obj: hashlib.sha256(js_stringify(obj["data"])).hexdigest()),
    ("python-sorted", lambda obj: hashlib.sha256(json.dumps(obj["data"], sort_keys=True).encode()).hexdigest()),
])
def test_other_known_noncanonical_forms_are_named(harness: Harness, form: str, checksum: Any) -> None:
    """A checksum over the whole object, over unsorted JSON.stringify or over Python's json.dumps is named."""
    obj = {"data": {"z": 1, "a": [1.5, {"y": None, "b": "é"}]}, "version": 2, "source": "pricing"}
    value = orjson.dumps({**obj, "checksum": checksum(obj)})
    routed = harness.feed(b"sku-1", value, [], now=NOW)
    assert codes(routed) == ["integrity.noncanonical"] and f"'{form}'" in routed.decision.reasons[0].detail


def test_value_only_checksum_where_the_bound_form_is_declared_is_named(harness: Harness) -> None:
    """A producer that declares bound but hashes the value only gets noncanonical naming value-only."""
    s = Stamper("pricing").binary(PRICE, type="price.updated", subject="sku-1", version=1, time=NOW)
    headers = changed(s.headers, "ce_checksum", digest(SHA256, s.value).encode())
    routed = harness.feed(s.key, s.value, headers, now=NOW)
    assert codes(routed) == ["integrity.noncanonical"] and "'value-only'" in routed.decision.reasons[0].detail


def test_bound_checksum_without_its_form_header_passes_with_a_warning(harness: Harness) -> None:
    """A bound checksum whose ce_checksumform was stripped still binds everything: it passes, and says so."""
    s = signed()
    routed = harness.feed(s.key, s.value, changed(s.headers, "ce_checksumform", None), now=NOW)
    assert routed.decision.outcome is Outcome.WARNED and codes(routed) == ["integrity.legacy_form"]
    assert "matches form 'bound'" in routed.decision.reasons[0].detail


@pytest.fixture
def form_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The forms whose input `integrity.form_input` computes, in order, while the test runs."""
    calls: list[str] = []
    real = integrity.form_input

    def counting(form: str, env: Envelope) -> bytes | None:
        calls.append(form)
        return real(form, env)

    monkeypatch.setattr(integrity, "form_input", counting)
    return calls


def test_the_fast_path_computes_one_form(harness: Harness, form_calls: list[str]) -> None:
    """A record that verifies in its declared form costs one form input; only a failure tries the others."""
    s = signed()
    assert harness.feed(s.key, s.value, s.headers, now=NOW).decision.outcome is Outcome.VERIFIED
    assert form_calls == [BOUND]
    form_calls.clear()
    harness.feed(b"sku-2", s.value, changed(s.headers, "ce_subject", b"sku-2"), now=NOW)
    assert form_calls == list(FORMS)


def test_large_records_are_not_reserialized_on_the_failure_path(harness: Harness, form_calls: list[str]) -> None:
    """Above DIAGNOSE_MAX_BYTES a failing checksum tries only bound and value-only (and declared forms), so a
    flood of large corrupted records costs no JSON serialization each; the reason says so."""
    big = {"price": 1.0, "currency": "USD", "blob": "x" * integrity.DIAGNOSE_MAX_BYTES}
    s = Stamper("pricing").binary(big, type="price.updated", subject="sku-1", version=1, time=NOW)
    routed = harness.feed(s.key, s.value.replace(b'"xxx', b'"yxx', 1), s.headers, now=NOW)
    assert codes(routed) == ["integrity.mismatch"] and "not tried above" in routed.decision.reasons[0].detail
    assert form_calls == [BOUND, VALUE_ONLY]


def test_check_integrity_accepts_only_the_given_forms() -> None:
    """The per-source set decides: the same value-only record is unbound under the default, legacy under it."""
    old = Stamper("pricing", form=VALUE_ONLY).binary(PRICE, type="price.updated", subject="sku-1")
    env = decode(old.key, old.value, old.headers)
    assert isinstance(env, Envelope)
    ring = KeyRing()
    assert [c for c, _ in check_integrity(env, DEFAULT_FORMS, ring, required=True)] == [Code.INTEGRITY_UNBOUND]
    assert [c for c, _ in check_integrity(env, DEFAULT_FORMS | {VALUE_ONLY}, ring, required=True)] == \
        [Code.INTEGRITY_LEGACY_FORM]


# --- configuration ---------------------------------------------------------------------------------------

def test_unknown_form_in_config_is_refused_with_its_line() -> None:
    """sources.<name>.forms names known forms only; a typo is refused with file:line at start."""
    text = ("sources:\n  shop:\n    forms: [value-only, js-sortd]\n"
            "routes:\n  - {name: r, inputs: [a], verified_topic: v, quarantine_topic: q, types: {t: {}}}\n")
    with pytest.raises(ConfigError, match=r"x\.yaml:3: sources\.shop\.forms: .*unknown integrity form"):
        guard_config.loads(text, source_path="x.yaml")


def test_inputs_take_plain_topics_and_declared_sources() -> None:
    """inputs mixes plain topic names and {topic, source}; an unknown field of an input is refused."""
    cfg = guard_config.loads("routes:\n  - name: r\n    inputs: [a, {topic: b, source: shop}]\n"
                             "    verified_topic: v\n    quarantine_topic: q\n    types: {t: {}}\n")
    assert cfg.routes[0].inputs == ("a", "b") and cfg.routes[0].input_sources == {"b": "shop"}
    assert cfg.route_for("b").name == "r"
    with pytest.raises(ConfigError, match=r"x\.yaml:3: routes\.0\.inputs\.1\.sorce"):
        guard_config.loads("routes:\n  - name: r\n    inputs: [a, {topic: b, sorce: shop}]\n"
                           "    verified_topic: v\n    quarantine_topic: q\n", source_path="x.yaml")
    with pytest.raises(ConfigError, match="input topic 'b'"):
        guard_config.loads("routes:\n  - {name: r, inputs: [{topic: b, source: x}], verified_topic: v, "
                           "quarantine_topic: q, types: {t: {}}}\n  - {name: s, inputs: [b], verified_topic: v2, "
                           "quarantine_topic: q2, types: {t: {}}}\n")


def test_sources_forms_always_include_bound() -> None:
    """A source's accepted forms are `bound` plus those it lists; sources not listed get `bound` only."""
    cfg = guard_config.loads(LENIENT, environ={"KEY_PRICING": "p", "KEY_ORDERS": "o"})
    forms = cfg.routes[0].fallback.forms
    assert forms["shop"] == {BOUND, VALUE_ONLY, "js-sorted"} and "pricing" not in forms


# --- verify again, downstream ----------------------------------------------------------------------------

def test_verify_again_checks_the_bound_form_and_accepts_declared_legacy_forms() -> None:
    """verify_again refuses a replayed bound record, and accepts a legacy one only with `forms`, as a warning."""
    ring = KeyRing({"pricing-1": PRICING_KEY})
    s = signed()
    assert verify_again(s.key, s.value, s.headers, ring).ok
    assert verify_again(b"sku-2", s.value, changed(s.headers, "ce_subject", b"sku-2"), ring).codes == \
        ("integrity.bad_mac",)
    old = Stamper("pricing", form=VALUE_ONLY).binary(PRICE, type="price.updated", subject="sku-1")
    assert verify_again(old.key, old.value, old.headers, ring).codes == ("integrity.unbound",)
    legacy = verify_again(old.key, old.value, old.headers, ring, forms={"pricing": {VALUE_ONLY}})
    assert legacy.ok and legacy.codes == ("integrity.legacy_form",) and legacy.describe().startswith("ok: ")


def test_verify_again_uses_the_routes_default_type_for_the_bound_form() -> None:
    """A bound record without ce_type binds the route's default type: verify_again verifies it once given it."""
    s = signed()
    headers = changed(s.headers, "ce_type", None)
    ring = KeyRing({"pricing-1": PRICING_KEY})
    assert verify_again(s.key, s.value, headers, ring).codes == ("integrity.bad_mac",)
    assert verify_again(s.key, s.value, headers, ring, default_type="price.updated").ok
    assert verify_again(s.key, s.value, headers, ring, default_type="signed.thing").codes == ("integrity.bad_mac",)


def test_deeply_nested_data_with_a_bad_checksum_is_a_mismatch_not_a_crash() -> None:
    """The failure path's re-serializations give up on data nested too deeply for them, without raising."""
    value = b'{"price":1,"n":' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}"
    s = Stamper("pricing").binary(value, type="price.updated", subject="sku-1", version=1, time=NOW)
    env = decode(s.key, value.replace(b'"price":1', b'"price":2'), s.headers)
    assert isinstance(env, Envelope)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # Python's default (other tests may raise it): json.dumps cannot go 1000 deep
    try:
        assert integrity.form_input("python-sorted", env) is None and integrity.form_input("js-sorted", env) is None
        assert [c for c, _ in check_integrity(env, DEFAULT_FORMS, KeyRing(), required=True)] == \
            [Code.INTEGRITY_MISMATCH]
    finally:
        sys.setrecursionlimit(limit)


def test_the_producer_instance_of_the_lamport_clock_is_bound(harness: Harness) -> None:
    """ce_lamportinstance (the writer whose Lamport clock this is) is covered: another instance fails."""
    s = Stamper("pricing", instance=None).binary(PRICE, type="price.updated", subject="sku-1", version=1, time=NOW)
    headers = [*s.headers[:-1], ("ce_lamportinstance", b"pod-a")]
    h = dict(headers)
    base = bound_base(h["ce_id"], h["ce_source"], h["ce_type"], h["ce_subject"], h, h["ce_checksumalg"], None, s.value)
    assert base is not None and b"\nlamportinstance: pod-a\n" in base
    headers.append(("ce_checksum", hashlib.sha256(base).hexdigest().encode()))
    assert harness.feed(s.key, s.value, headers, now=NOW).decision.outcome is Outcome.VERIFIED
    routed = harness.feed(s.key, s.value, changed(headers, "ce_lamportinstance", b"pod-b"), now=NOW)
    assert codes(routed) == ["integrity.mismatch"]


def test_a_legacy_form_event_keeps_the_last_known_good_unless_the_type_says_replace() -> None:
    """Warned by integrity.legacy_form, a later value does not replace the last-known-good (it may be a replay
    under another version) unless the type sets last_good_on_warn: replace."""
    from byzguard.state import EntityState
    for setting, expected in (("", 10.0), ("        last_good_on_warn: replace\n", 11.0)):
        h = Harness(LENIENT.replace("        sources: [pricing, orders, shop]\n",
                                    "        sources: [pricing, orders, shop]\n" + setting))
        shop = Stamper("shop", form=VALUE_ONLY)
        for version, price in ((1, 10.0), (2, 11.0)):
            s = shop.binary({"price": price, "currency": "USD"}, type="price.updated", subject="sku-1",
                            version=version, time=NOW)
            assert codes(h.feed(s.key, s.value, s.headers, now=NOW)) == ["integrity.legacy_form"]
        state = EntityState.from_bytes(h.entities[b"sku-1"])
        assert state.version == 2 and state.last_good_data()["price"] == expected
