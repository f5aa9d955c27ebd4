"""The machine-readable envelope vectors (tests/vectors/envelope.json) hold for this implementation.

Producers in other languages run the same file; here the digests are recomputed with hashlib, hmac and
xxhash directly, and the bound form's signature base is rebuilt from the record by an independent reading
of ENVELOPE.md, so the vectors do not merely agree with the code that wrote them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import rfc8785
import xxhash

from byzguard import config as guard_config
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, Guard, RecordIn
from tests.conftest import require

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
                      [(k, v.encode()) for k, v in rec["headers"]], rec["topic"], 0, 0)
    return Guard(cfg).process(record, cfg.routes[0], EMPTY_STATE, now=VECTORS["now"]).first


def test_vectors_cover_every_shape_and_algorithm() -> None:
    """The file has binary, structured and seed shapes under all three algorithms, and failing cases."""
    names = set(CASES)
    for alg in ("sha256", "xxh3-128", "hmac-sha256"):
        assert {f"binary-{alg}", f"structured-{alg}"} <= names
    assert {"seed-checksum", "seed-versioned", "seed-lamport", "corrupted", "forged"} <= names
    assert {"replayed-subject", "replayed-version", "attribute-changed", "value-only-refused",
            "value-only-accepted", "seed-checksum-declared-topic", "seed-js-sorted-noncanonical",
            "seed-js-sorted-declared"} <= names


@pytest.mark.parametrize("name", sorted(CASES))
def test_vector_verdict(name: str) -> None:
    """Each record gets exactly the outcome and codes the vector states."""
    case = CASES[name]
    routed = _run(case)
    assert routed.decision.outcome.value == case["expect"]["outcome"]
    assert [r.code.value for r in routed.decision.reasons] == case["expect"]["codes"]


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if "covered" in c["expect"]))
def test_vector_covered_bytes_and_digests(name: str) -> None:
    """The covered and signed bytes match the vector, and its digests match independent hash implementations."""
    case = CASES[name]
    routed = _run(case)
    covered = _bytes(case["expect"]["covered"])
    assert routed.envelope.covered == covered
    assert routed.envelope.form == case["expect"]["form"]
    signed = _bytes(case["expect"]["signed"])
    digests = case["expect"]["digests"]
    assert digests["sha256"] == hashlib.sha256(signed).hexdigest()
    assert digests["xxh3-128"] == xxhash.xxh3_128(signed).hexdigest()
    secret = VECTORS["keys"][0]["secret"].encode()
    assert digests["hmac-sha256/pricing-1"] == hmac.new(secret, signed, hashlib.sha256).hexdigest()
    if case["expect"]["form"] == "value-only":
        assert signed == covered


# ENVELOPE.md, "The bound form": the components in order, as (line name, binary-mode header, structured
# attribute). id, source, type, subject and checksumalg are always present.
SPEC_COMPONENTS = [("id", "ce_id", "id"), ("source", "ce_source", "source"), ("type", "ce_type", "type"),
                   ("subject", "ce_subject", "subject"), ("time", "ce_time", "time"),
                   ("entityversion", "ce_entityversion", "entityversion"),
                   ("lamporttime", "ce_lamporttime", "lamporttime"),
                   ("lamportinstance", "ce_lamportinstance", "lamportinstance"),
                   ("vectorclock", "ce_vectorclock", "vectorclock"),
                   ("datacontenttype", "content-type", "datacontenttype"),
                   ("checksumalg", "ce_checksumalg", "checksumalg"), ("keyid", "ce_keyid", "keyid")]


def _spec_base(case: dict[str, Any]) -> bytes:
    """The bound form's signature base rebuilt from the record alone, following ENVELOPE.md literally."""
    rec = case["record"]
    value = _bytes(rec["value"])
    headers = dict(rec["headers"])
    if "ce_specversion" in headers:
        texts = {line: headers.get(header) for line, header, _ in SPEC_COMPONENTS}
        texts["subject"] = texts["subject"] or rec["key"]
        texts["type"] = texts["type"] or "price.updated"  # the vector route's default_type
        data = value
    else:
        event = json.loads(value)
        texts = {line: event.get(attr) for line, _, attr in SPEC_COMPONENTS}
        for line in ("entityversion", "lamporttime"):
            texts[line] = str(texts[line]) if texts[line] is not None else None
        data = rfc8785.dumps(event["data"])
    lines = ["checksumform: bound"] + [f"{line}: {texts[line]}" for line, _, _ in SPEC_COMPONENTS
                                       if texts[line] is not None]
    return ("\n".join(lines) + "\ndata: ").encode() + data


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c["expect"].get("form") == "bound"))
def test_bound_form_base_follows_the_spec(name: str) -> None:
    """Every bound-form vector's signed bytes are the base ENVELOPE.md describes, rebuilt from the record."""
    case = CASES[name]
    assert _bytes(case["expect"]["signed"]) == _spec_base(case)


@pytest.mark.parametrize("name", ["binary-sha256", "structured-xxh3-128", "binary-hmac-sha256",
                                  "structured-hmac-sha256"])
def test_checksum_of_a_clean_bound_vector_is_the_digest_of_its_spec_base(name: str) -> None:
    """A clean record's own checksum is the digest of the spec's base: what a producer in any language computes."""
    case = CASES[name]
    rec = case["record"]
    headers = dict(rec["headers"])
    claimed = headers.get("ce_checksum") or json.loads(_bytes(rec["value"]))["checksum"]
    alg = headers.get("ce_checksumalg") or json.loads(_bytes(rec["value"]))["checksumalg"]
    base = _spec_base(case)
    if alg == "hmac-sha256":
        expected = hmac.new(VECTORS["keys"][0]["secret"].encode(), base, hashlib.sha256).hexdigest()
    elif alg == "sha256":
        expected = hashlib.sha256(base).hexdigest()
    else:
        expected = xxhash.xxh3_128(base).hexdigest()
    assert claimed == expected


# The TypeScript snippet of ENVELOPE.md, as plain JavaScript, run over every binary-mode bound vector.
JS_PRODUCER = r"""
const { createHmac, createHash } = require("node:crypto");
const vectors = JSON.parse(require("node:fs").readFileSync(process.argv[2], "utf8"));
const secret = vectors.keys[0].secret;
const out = {};
for (const c of vectors.cases) {
  const h = Object.fromEntries(c.record.headers);
  if (!("ce_specversion" in h) || h.ce_checksumform !== "bound") continue;
  const value = Buffer.from(c.record.value.text, "utf8");
  const alg = h.ce_checksumalg;
  const lines = [["checksumform", "bound"], ["id", h.ce_id], ["source", h.ce_source],
    ["type", h.ce_type ?? "price.updated"], ["subject", h.ce_subject ?? c.record.key],
    ["time", h.ce_time], ["entityversion", h.ce_entityversion], ["lamporttime", h.ce_lamporttime],
    ["lamportinstance", h.ce_lamportinstance], ["vectorclock", h.ce_vectorclock],
    ["datacontenttype", h["content-type"]], ["checksumalg", alg],
    ["keyid", h.ce_keyid]]
    .filter(([, v]) => v !== undefined).map(([k, v]) => `${k}: ${v}\n`).join("");
  const base = Buffer.concat([Buffer.from(lines + "data: ", "utf8"), value]);
  if (alg === "hmac-sha256") out[c.name] = createHmac("sha256", secret).update(base).digest("hex");
  else if (alg === "sha256") out[c.name] = createHash("sha256").update(base).digest("hex");
}
console.log(JSON.stringify(out));
"""


def test_a_javascript_producer_following_the_spec_reproduces_the_vectors(tmp_path: Path) -> None:
    """ENVELOPE.md's JavaScript recipe, run by node, gives each clean binary vector's own checksum, and not
    that of a replayed record."""
    node = require("node", "Node.js; `make clients` builds the TypeScript producer with it")
    script = tmp_path / "producer.js"
    script.write_text(JS_PRODUCER)
    vectors = Path(__file__).parents[1] / "vectors" / "envelope.json"
    made = json.loads(subprocess.run([node, str(script), str(vectors)], check=True, capture_output=True,
                                     text=True).stdout)
    for name in ("binary-sha256", "binary-hmac-sha256"):
        assert made[name] == dict(CASES[name]["record"]["headers"])["ce_checksum"]
    for name in ("replayed-subject", "replayed-version", "attribute-changed"):
        assert made[name] != dict(CASES[name]["record"]["headers"])["ce_checksum"]
