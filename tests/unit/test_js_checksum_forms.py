"""Checksums made by real JavaScript (node), not by a Python imitation of it: a producer's hand-written
`canonicalize` (recursive `Object.keys(o).sort()`, then `JSON.stringify`) and `withChecksum` sending the plain
`{data, checksum}` shape get the codes ENVELOPE.md gives them ("Integrity forms")."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from byzguard import config as guard_config
from byzguard import jcs
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, Guard, RecordIn
from tests.conftest import require


@pytest.fixture(autouse=True)
def node() -> str:
    """node, which `make test` needs too (it builds the TypeScript producer with npm)."""
    return require("node", "Node.js; `make clients` builds the TypeScript producer with it")


VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "envelope.json").read_text())

# A JavaScript producer's checksum code, as such services write it; prints, for each JSON text on stdin,
# the record value it sends and the bytes its two serializations give.
PRODUCER = r"""
const { createHash } = require("node:crypto");
function canonicalize(value) {
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map(canonicalize);
  return Object.keys(value).sort().reduce((acc, key) => {
    acc[key] = canonicalize(value[key]);
    return acc;
  }, {});
}
function withChecksum(data) {
  const serialized = JSON.stringify(canonicalize(data));
  const checksum = createHash("sha256").update(serialized).digest("hex");
  return { data, checksum };
}
const out = JSON.parse(require("node:fs").readFileSync(0, "utf8")).map((text) => {
  const data = JSON.parse(text);
  return { value: JSON.stringify(withChecksum(data)), sorted: JSON.stringify(canonicalize(data)),
           stringify: JSON.stringify(data) };
});
console.log(JSON.stringify(out));
"""

#: Data without integer-like keys (the sorted form is RFC 8785's), and with them, nested, mixed with
#: non-ASCII keys, keys that are not array indices ("01", "-1", 2**32 - 1), and numbers JSON.stringify rewrites.
PLAIN = ['{"productId":"sku-1","price":49.99,"currency":"USD","tags":["b","a"],"n":{"z":1e-7,"a":100.0}}',
         '{"é":1,"e":2,"\\u20ac":3,"\\ud83d\\ude00":4,"A":[{"y":-0.0,"x":1e21}]}']
INTEGER_KEYS = ['{"9":1.5,"10":2.5,"currency":"USD"}',
                '{"b":{"2":1,"1":2,"x":[{"0":0,"a":1}]},"4294967294":1,"4294967295":2,"01":3,"-1":4,"a":1}']


def javascript(texts: list[str]) -> list[dict[str, str]]:
    """What the JavaScript producer makes of each JSON text."""
    done = subprocess.run(["node", "-e", PRODUCER], input=json.dumps(texts), capture_output=True, text=True,
                          timeout=60, check=True)
    return list(json.loads(done.stdout))


def verdict(value: str, topic: str) -> tuple[str, list[str]]:
    """The guard's outcome and codes for a `{data, checksum}` record on the vectors' route: topic `in.shop` is
    source `shop`'s, declared to use value-only and js-sorted; on `in` the record names source pricing."""
    cfg = guard_config.loads(VECTORS["config"], environ={"K1": "k1", "K2": "k2"})
    headers = [] if topic == "in.shop" else [("ce_source", b"pricing")]
    record = RecordIn(b"sku-1", value.encode(), headers, topic, 0, 0)
    routed = Guard(cfg).process(record, cfg.routes[0], {ENTITIES: {}, LAMPORTS: {}, CAUSAL: {}},
                                now=VECTORS["now"]).first
    return routed.decision.outcome.value, [r.code.value for r in routed.decision.reasons]


def test_the_javascript_serializations_are_what_the_guard_reproduces() -> None:
    """jcs.js_sorted and jcs.js_stringify give node's bytes exactly, and for data without integer-like keys the
    sorted form is RFC 8785's."""
    texts = PLAIN + INTEGER_KEYS
    for text, made in zip(texts, javascript(texts), strict=True):
        data = json.loads(text)
        assert jcs.js_sorted(data).decode() == made["sorted"], text
        assert jcs.js_stringify(data).decode() == made["stringify"], text
        assert (jcs.canonicalize(data).decode() == made["sorted"]) is (text in PLAIN), text


def test_a_javascript_checksum_gets_the_documented_codes() -> None:
    """A JavaScript producer's {data, checksum}: without integer-like keys value-only (a legacy_form warning
    where its source is declared, integrity.unbound elsewhere); with them js-sorted (legacy_form where
    declared, integrity.noncanonical elsewhere); never integrity.mismatch."""
    for text, made in zip(PLAIN, javascript(PLAIN), strict=True):
        assert verdict(made["value"], "in.shop") == ("warned", ["integrity.legacy_form"]), text
        assert verdict(made["value"], "in") == ("quarantined", ["integrity.unbound"]), text
    for text, made in zip(INTEGER_KEYS, javascript(INTEGER_KEYS), strict=True):
        assert verdict(made["value"], "in.shop") == ("warned", ["integrity.legacy_form"]), text
        assert verdict(made["value"], "in") == ("quarantined", ["integrity.noncanonical"]), text
