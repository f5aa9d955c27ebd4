"""The machine-readable envelope vectors (tests/vectors/envelope.json) hold for this implementation.

Producers in other languages run the same file; here the digests are recomputed with hashlib, hmac and
xxhash directly, so the vectors do not merely agree with the code that wrote them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
import xxhash

from byzguard import config as guard_config
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, Guard, RecordIn

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "envelope.json").read_text())
EMPTY_STATE: dict[str, dict[bytes, bytes]] = {ENTITIES: {}, LAMPORTS: {}, CAUSAL: {}}
CASES = {case["name"]: case for case in VECTORS["cases"]}


def _bytes(value: dict[str, str]) -> bytes:
    return value["text"].encode() if "text" in value else base64.b64decode(value["base64"])


def _run(case: dict[str, Any]) -> Any:
    secrets = {"K1": VECTORS["keys"][0]["secret"], "K2": VECTORS["keys"][1]["secret"]}
    cfg = guard_config.loads(VECTORS["config"], environ=secrets)
    rec = case["record"]
    record = RecordIn(rec["key"].encode() if rec["key"] is not None else None, _bytes(rec["value"]),
                      [(k, v.encode()) for k, v in rec["headers"]], "in", 0, 0)
    return Guard(cfg).process(record, cfg.routes[0], EMPTY_STATE, now=VECTORS["now"]).first


def test_vectors_cover_every_shape_and_algorithm() -> None:
    """The file has binary, structured and seed shapes under all three algorithms, and failing cases."""
    names = set(CASES)
    for alg in ("sha256", "xxh3-128", "hmac-sha256"):
        assert {f"binary-{alg}", f"structured-{alg}"} <= names
    assert {"seed-checksum", "seed-versioned", "seed-lamport", "corrupted", "forged"} <= names


@pytest.mark.parametrize("name", sorted(CASES))
def test_vector_verdict(name: str) -> None:
    """Each record gets exactly the outcome and codes the vector states."""
    case = CASES[name]
    routed = _run(case)
    assert routed.decision.outcome.value == case["expect"]["outcome"]
    assert [r.code.value for r in routed.decision.reasons] == case["expect"]["codes"]


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if "covered" in c["expect"]))
def test_vector_covered_bytes_and_digests(name: str) -> None:
    """The covered bytes match the vector, and its digests match independent hash implementations."""
    case = CASES[name]
    routed = _run(case)
    covered = _bytes(case["expect"]["covered"])
    assert routed.envelope.covered == covered
    digests = case["expect"]["digests"]
    assert digests["sha256"] == hashlib.sha256(covered).hexdigest()
    assert digests["xxh3-128"] == xxhash.xxh3_128(covered).hexdigest()
    secret = VECTORS["keys"][0]["secret"].encode()
    assert digests["hmac-sha256/pricing-1"] == hmac.new(secret, covered, hashlib.sha256).hexdigest()
