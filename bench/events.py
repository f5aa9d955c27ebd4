"""The benchmark's input: valid, HMAC-signed price events over many entities, and the guard config that checks them.

Every event passes every check (a clean stream), so byzguard forwards all of them and each variant's output
count equals its input count. Entity i gets versions 1, 2, ... in order; one producer (source `pricing`)
stamps them, so its Lamport time rises in every partition.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from byzguard.clocks import VectorClock
from byzguard.integrity import HMAC_SHA256, Key
from byzguard.stamp import Stamped, Stamper, rfc3339

SOURCE = "pricing"
EVENT_TYPE = "price.updated"
KEY_ID = "bench-1"
SECRET_ENV = "BYZGUARD_KEY_BENCH_1"
SECRET = "bench-secret-not-for-production"
SEQ_HEADER = "bench_seq"        # the event's index in the input; outputs keep it (crash accounting)
SENT_HEADER = "bench_sent_ns"   # time.time_ns() at send (latency runs)
ROUTE = "bench"

_CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "SEK", "NOK", "DKK")


def stamper() -> Stamper:
    """The benchmark producer: source `pricing`, HMAC-SHA256 with the bench key."""
    return Stamper(SOURCE, algorithm=HMAC_SHA256, key=Key(KEY_ID, SOURCE, SECRET.encode()))


def price_data(entity: int, version: int, at: float) -> dict[str, Any]:
    """The data of one price event (a structured-mode event is then about 460 bytes)."""
    price = round(10 + (entity % 997) * 0.37 + version * 0.01, 2)  # moves far less than the 50% rule allows
    return {"price": price, "currency": _CURRENCIES[entity % len(_CURRENCIES)], "lastUpdated": rfc3339(at),
            "qtyAvailable": (entity * 7 + version) % 500}


def events(count: int, entities: int, *, at: float, mode: str = "structured", prefix: str = "sku",
           stamp: Stamper | None = None) -> Iterator[Stamped]:
    """`count` valid events, round-robin over `entities` entities (entity i's versions 1, 2, ... in order)."""
    stamp = stamp or stamper()
    make = stamp.structured if mode == "structured" else stamp.binary
    for i in range(count):
        entity = i % entities
        version = i // entities + 1
        yield make(price_data(entity, version, at), type=EVENT_TYPE, subject=f"{prefix}-{entity:07d}",
                   version=version, time=at, vclock=VectorClock({SOURCE: version}))


def records(stamped: Iterator[Stamped], *, seq: bool = True) -> Iterator[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """Kafka records (key, value, headers) of stamped events, with the sequence header when `seq`."""
    for i, s in enumerate(stamped):
        headers = [*s.headers, (SEQ_HEADER, str(i).encode())] if seq else s.headers
        yield s.key, s.value, headers


def shipped_rules(repo: Path) -> list[dict[str, Any]]:
    """The CEL rules of `price.updated` in the shipped byzguard.yaml: the benchmark checks what users run."""
    shipped = yaml.safe_load((repo / "byzguard.yaml").read_text())
    for route in shipped["routes"]:
        rules = route.get("types", {}).get(EVENT_TYPE, {}).get("rules")
        if rules:
            return list(rules)
    raise RuntimeError("byzguard.yaml has no rules for price.updated")


def write_config(path: Path, *, repo: Path, input_topic: str, verified: str, quarantine: str, partitions: int,
                 rules: bool = True, causal_buffer: bool = False) -> Path:
    """A guard configuration with every check at reject (version.gap: warn) and the shipped CEL rules."""
    type_policy: dict[str, Any] = {"sources": [SOURCE], "key_ids": [KEY_ID]}
    if rules:
        type_policy["rules"] = shipped_rules(repo)
    route: dict[str, Any] = {
        "name": ROUTE, "inputs": [input_topic], "verified_topic": verified, "quarantine_topic": quarantine,
        "partitions": partitions, "default_type": EVENT_TYPE, "require_checksum": True,
        "types": {EVENT_TYPE: type_policy},
    }
    if causal_buffer:
        route["causal"] = {"buffer": True}
    config = {
        "defaults": {
            "policy": "fail_closed",
            "checks": {c: "reject" for c in ("integrity", "authorization", "idempotency", "version", "causal",
                                             "time", "invariant")},
            "codes": {"version.gap": "warn"},
            "max_skew": "5s",
            "max_age": "24h",
        },
        "keys": {KEY_ID: {"source": SOURCE, "secret_env": SECRET_ENV}},
        "idempotency": {"ids_per_entity": 32, "window": "24h"},
        "routes": [route],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def secret_env() -> dict[str, str]:
    """The environment a worker needs to verify the bench MACs."""
    return {SECRET_ENV: os.environ.get(SECRET_ENV, SECRET)}
