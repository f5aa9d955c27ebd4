"""Regenerate tests/vectors/envelope.json: `python tests/vectors/make_envelope_vectors.py`.

Each case is a record (topic, key, value, headers) with what a conforming guard must compute: the data
(`covered`), the integrity form the record declares, the bytes that form's checksum covers (`signed`: the
signature base of the bound form), their digests, and the verdict codes against empty state under the
vector config. Values are given as UTF-8 text when they are text, else as base64.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import orjson

from byzguard import config as guard_config
from byzguard.clocks import VectorClock
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, Guard, RecordIn
from byzguard.integrity import HMAC_SHA256, SHA256, VALUE_ONLY, XXH3_128, Key, digest, form_input
from byzguard.jcs import js_sorted
from byzguard.stamp import Stamped, Stamper, seed_checksum_event

HERE = Path(__file__).parent
NOW = 1_800_000_000.0  # the "current time" every case is evaluated at (2027-01-15T08:00:00Z)
KEYS = [{"key_id": "pricing-1", "source": "pricing", "secret": "pricing-secret"},
        {"key_id": "orders-1", "source": "orders", "secret": "orders-secret"}]
CONFIG = """
defaults: {max_skew: 5s, max_age: 24h}
keys:
  pricing-1: {source: pricing, secret_env: K1}
  orders-1: {source: orders, secret_env: K2}
sources:
  shop: {forms: [value-only, js-sorted]}
routes:
  - name: vectors
    inputs: [in, {topic: in.shop, source: shop}]
    verified_topic: out
    quarantine_topic: bad
    default_type: price.updated
    types:
      price.updated:
        sources: [pricing, shop]
"""
PRICING = Key("pricing-1", "pricing", b"pricing-secret")
ORDERS = Key("orders-1", "orders", b"orders-secret")
DATA = {"productId": "sku-1", "price": 49.99, "currency": "USD", "tags": ["a", "é"], "qty": 100.0}


def _value(raw: bytes) -> dict[str, str]:
    try:
        return {"text": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode()}


def main() -> None:
    cfg = guard_config.loads(CONFIG, environ={"K1": "pricing-secret", "K2": "orders-secret"})
    guard = Guard(cfg)
    cases: list[dict[str, Any]] = []

    def add(name: str, description: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
            topic: str = "in") -> None:
        state: dict[str, dict[bytes, bytes]] = {ENTITIES: {}, LAMPORTS: {}, CAUSAL: {}}
        routed = guard.process(RecordIn(key, value, headers, topic, 0, 0), cfg.routes[0], state, now=NOW).first
        env = routed.envelope
        expect: dict[str, Any] = {"outcome": routed.decision.outcome.value,
                                  "codes": [r.code.value for r in routed.decision.reasons]}
        if env is not None:
            expect["covered"] = _value(env.covered)
            expect["form"] = env.form
            signed = form_input(env.form, env)
            assert signed is not None, name
            expect["signed"] = _value(signed)
            expect["digests"] = {SHA256: digest(SHA256, signed), XXH3_128: digest(XXH3_128, signed),
                                 "hmac-sha256/pricing-1": digest(HMAC_SHA256, signed, PRICING)}
        cases.append({"name": name, "description": description,
                      "record": {"topic": topic, "key": key.decode() if key is not None else None,
                                 "value": _value(value),
                                 "headers": [[k, v.decode("utf-8", "replace")] for k, v in headers]},
                      "expect": expect})

    fixed = {"event_id": "11111111-2222-3333-4444-555555555555", "time": NOW - 60, "version": 3}
    clock = VectorClock({"pricing": 3, "eu-1": 2})
    for alg, key in ((SHA256, None), (XXH3_128, None), (HMAC_SHA256, PRICING)):
        s = Stamper("pricing", algorithm=alg, key=key, lamport=41)
        b = s.binary(DATA, type="price.updated", subject="sku-1", vclock=clock, **fixed)  # type: ignore[arg-type]
        add(f"binary-{alg}", f"binary mode, bound form: {alg} over the attributes and the value bytes",
            b.key, b.value, b.headers)
        st = s.structured(DATA, type="price.updated", subject="sku-1", vclock=clock, **fixed)  # type: ignore[arg-type]
        add(f"structured-{alg}", f"structured mode, bound form: {alg} over the attributes and JCS(data)",
            st.key, st.value, st.headers)
    signer = Stamper("pricing", algorithm=HMAC_SHA256, key=PRICING, lamport=41)
    signed = signer.binary(DATA, type="price.updated", subject="sku-1", **fixed)  # type: ignore[arg-type]
    add("replayed-subject", "a captured signed record re-sent as another entity (key and ce_subject changed)",
        b"sku-2", signed.value, _with(signed.headers, ce_subject=b"sku-2"))
    add("replayed-version", "a captured signed record re-sent as a newer version (ce_entityversion changed)",
        signed.key, signed.value, _with(signed.headers, ce_entityversion=b"9"))
    plain = Stamper("pricing", lamport=41).binary(DATA, type="price.updated", subject="sku-1", **fixed)  # type: ignore[arg-type]
    add("attribute-changed", "ce_time changed in transit after the sha256 was computed", plain.key, plain.value,
        _with(plain.headers, ce_time=b"2027-01-15T07:59:30.000Z"))
    old = Stamper("pricing", lamport=41, form=VALUE_ONLY).binary(
        DATA, type="price.updated", subject="sku-1", **fixed)  # type: ignore[arg-type]
    add("value-only-refused", "the first release's value-only form from a source not declared to use it",
        *_parts(old))
    shop = Stamper("shop", lamport=41, form=VALUE_ONLY).binary(
        DATA, type="price.updated", subject="sku-1", **fixed)  # type: ignore[arg-type]
    add("value-only-accepted", "the value-only form from a source declared to use it: passes with a warning",
        *_parts(shop))
    seed = seed_checksum_event(DATA)
    add("seed-checksum", "the seed's {data, checksum} shape from a source not declared to use value-only",
        b"sku-1", seed, [("ce_source", b"pricing")])
    add("seed-checksum-declared-topic", "the seed's {data, checksum} shape with no headers, on an input topic "
        "declared as written by source shop (which may use value-only)", b"sku-1", seed, [], topic="in.shop")
    js_data = {"9": 1.5, "10": 2.5, "currency": "USD"}
    js_seed = orjson.dumps({"data": js_data, "checksum": digest(SHA256, js_sorted(js_data))})
    add("seed-js-sorted-noncanonical", "a JavaScript canonicalizer's {data, checksum}: integer-like keys sorted "
        "first; the source is not declared to use js-sorted", b"sku-1", js_seed, [("ce_source", b"pricing")])
    add("seed-js-sorted-declared", "the same from source shop, declared to use js-sorted", b"sku-1", js_seed, [],
        topic="in.shop")
    add("seed-versioned", "the seed's {data, version, updatedAt, source} shape", b"sku-1",
        orjson.dumps({"data": DATA, "version": 2, "updatedAt": "2027-01-15T07:59:00Z", "source": "pricing"}), [])
    add("seed-lamport", "the seed's {payload, logicalTimestamp, sourceService} shape", b"sku-1",
        orjson.dumps({"payload": DATA, "logicalTimestamp": 7, "sourceService": "pricing"}), [])
    s = Stamper("pricing", lamport=41)
    good = s.binary(DATA, type="price.updated", subject="sku-1", **fixed)  # type: ignore[arg-type]
    add("corrupted", "one byte of the value changed after the checksum", good.key,
        good.value.replace(b"49.99", b"49.98"), good.headers)
    forged = Stamper("pricing", algorithm=HMAC_SHA256, key=ORDERS).binary(
        DATA, type="price.updated", subject="sku-1", **fixed)  # type: ignore[arg-type]
    add("forged", "claims source pricing, signed with orders' key", forged.key, forged.value, forged.headers)
    add("not-allowed", "a source that may not emit price.updated", *_parts(Stamper("inventory").binary(
        DATA, type="price.updated", subject="sku-1", **fixed)))  # type: ignore[arg-type]
    add("future", "event time 30 s ahead, skew tolerance 5 s", *_parts(s.binary(
        DATA, type="price.updated", subject="sku-1", event_id="f", time=NOW + 30, version=1)))
    add("stale", "event time 25 h old, max age 24 h", *_parts(s.binary(
        DATA, type="price.updated", subject="sku-1", event_id="g", time=NOW - 25 * 3600, version=1)))
    add("key-mismatch", "record key differs from ce_subject", b"sku-2", good.value, good.headers)
    add("malformed", "not JSON and no ce_ headers", b"sku-1", b"\x00\x01garbage", [])
    add("unsupported", "JSON that is no known shape", b"sku-1", b'{"hello":"world"}', [])
    add("type-unlisted", "a type the route does not list (types are an allow-list)", *_parts(s.binary(
        DATA, type="price.updatedd", subject="sku-1", **fixed)))  # type: ignore[arg-type]
    add("ambiguous", "binary JSON data that repeats a key: parsers disagree on which value counts", *_parts(s.binary(
        b'{"productId":"sku-1","price":-1,"price":49.99}', type="price.updated", subject="sku-1",
        **fixed)))  # type: ignore[arg-type]
    add("declared-json-not-json", "content-type application/json, bytes that are not JSON", *_parts(s.binary(
        b"price=49.99", type="price.updated", subject="sku-1", **fixed)))  # type: ignore[arg-type]
    doc = {"about": "byzguard envelope test vectors; see ENVELOPE.md. Evaluate each record against empty state "
                    "at time `now` under `config`.", "now": NOW, "config": CONFIG.strip(), "keys": KEYS,
           "cases": cases}
    (HERE / "envelope.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def _parts(stamped: Stamped) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return stamped.key, stamped.value, stamped.headers


def _with(headers: list[tuple[str, bytes]], **changed: bytes) -> list[tuple[str, bytes]]:
    return [(k, changed.get(k, v)) for k, v in headers]


if __name__ == "__main__":
    main()
