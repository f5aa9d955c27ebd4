"""Contract checks: a producer's sample runs through a route's checks, in order, before anything is deployed."""

from __future__ import annotations

import base64
import json
import textwrap
import time
from typing import Any

import orjson
import pytest

from byzguard.clocks import VectorClock
from byzguard.contract import ContractError, Snapshot, contract_from_text, diff_contracts
from byzguard.contract.sample import SampleError, parse_jsonl
from byzguard.guard import ENTITIES, Guard, RecordIn
from byzguard.integrity import HMAC_SHA256, SHA256, Key, KeyRing
from byzguard.stamp import Stamped, Stamper
from byzguard.verdict import Outcome
from byzguard.verify_again import verify_again, verify_record

NOW = 1_796_000_000.0  # 2026-12-01
SECRET = "pricing-test-secret"
KEY = Key("pricing-1", "pricing", SECRET.encode())

CONFIG = """
defaults:
  max_skew: 5s
  max_age: 24h
keys:
  pricing-1: {source: pricing, secret_env: TEST_KEY_PRICING_1}
routes:
  - name: prices
    inputs: [prices]
    verified_topic: prices.verified
    quarantine_topic: prices.quarantine
    default_type: price.updated
    require_checksum: true
    types:
      price.updated:
        sources: [pricing]
        key_ids: [pricing-1]
        rules:
          - {name: price_positive, expr: "data.price > 0"}
          - {name: currency_iso, expr: "data.currency.matches('^[A-Z]{3}$')"}
          - {name: fresh, expr: "now - timestamp(data.lastUpdated) < duration('24h')"}
"""


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def contract(text: str = CONFIG, **kwargs: Any) -> Any:
    kwargs.setdefault("secrets", {"pricing-1": SECRET})
    return contract_from_text(textwrap.dedent(text), "prices", source_path="test.yaml", **kwargs)


def price(sku: str, value: float, *, updated: Any = None, currency: str = "USD") -> dict[str, Any]:
    return {"sku": sku, "price": value, "currency": currency,
            "lastUpdated": iso(NOW - 60) if updated is None else updated}


def stamp(stamper: Stamper, data: dict[str, Any], version: int) -> Stamped:
    return stamper.binary(data, type="price.updated", subject=data["sku"], version=version, time=NOW - 1)


@pytest.fixture
def stamper() -> Stamper:
    return Stamper("pricing", algorithm=HMAC_SHA256, key=KEY)


def clean_sample(stamper: Stamper) -> list[Stamped]:
    return [stamp(stamper, price("sku-1", 49.99), 1), stamp(stamper, price("sku-2", 19.5), 1),
            stamp(stamper, price("sku-1", 51.0), 2)]


# --------------------------------------------------------------------------- semantic drift


def test_clean_sample_passes(stamper: Stamper) -> None:
    """A producer sample that keeps the contract passes with every event verified and no finding."""
    report = contract().check(clean_sample(stamper), now=NOW)
    assert report.passed, report.format()
    assert report.total == 3
    assert report.outcomes == {Outcome.VERIFIED: 3}
    assert report.findings == ()


def test_price_zero_for_unknown_product_is_invariant_violated(stamper: Stamper) -> None:
    """A producer that answers an unknown product with price 0 fails the contract with invariant.violated."""
    sample = [*clean_sample(stamper), stamp(stamper, price("sku-unknown", 0), 1)]
    report = contract().check(sample, now=NOW)
    assert not report.passed
    [finding] = report.rejected
    assert finding.index == 3 and finding.key == "sku-unknown"
    assert finding.outcome is Outcome.QUARANTINED
    assert finding.codes == ("invariant.violated",)
    assert "price_positive" in finding.reasons[0].detail and "data.price=0" in finding.reasons[0].detail
    assert "invariant.violated" in report.format() and "#3 key='sku-unknown'" in report.format()


def test_timestamp_switched_from_iso_to_epoch_is_invariant_error(stamper: Stamper) -> None:
    """The seed's NaN drift (lastUpdated sent as epoch seconds instead of ISO 8601) fails with invariant.error."""
    sample = clean_sample(stamper)
    drifted = stamp(stamper, price("sku-3", 12.0, updated=int(NOW - 60)), 1)
    report = contract().check([*sample, drifted], now=NOW)
    [finding] = report.rejected
    assert finding.codes == ("invariant.error",)
    reason = finding.reasons[0]
    assert reason.check == "invariant"
    assert "'fresh'" in reason.detail and "timestamp" in reason.detail.lower()


def test_stale_iso_timestamp_is_invariant_violated(stamper: Stamper) -> None:
    """A well-formed but two-day-old lastUpdated violates the freshness rule rather than erroring."""
    old = stamp(stamper, price("sku-4", 12.0, updated=iso(NOW - 2 * 86_400)), 1)
    report = contract().check([old], now=NOW)
    assert [f.codes for f in report.rejected] == [("invariant.violated",)]


def test_several_failures_are_each_reported_with_check_code_and_detail(stamper: Stamper) -> None:
    """Every failing rule of an event is listed, each with its check, code, severity and detail."""
    bad = stamp(stamper, price("sku-5", 0, currency="usd", updated=NOW), 1)
    [finding] = contract().check([bad], now=NOW).rejected
    assert sorted(finding.codes) == ["invariant.error", "invariant.violated", "invariant.violated"]
    assert all(r.check == "invariant" and r.severity.value == "reject" for r in finding.reasons)
    assert finding.as_dict()["reasons"][0].keys() == {"check", "code", "severity", "detail"}


def test_integrity_and_authorization_failures_are_found(stamper: Stamper) -> None:
    """Unsigned events, events from another source and corrupted bytes fail with their own codes."""
    unsigned = Stamper("pricing").binary(price("sku-1", 5.0), type="price.updated", subject="sku-1", version=1)
    foreign = Stamper("orders", algorithm=HMAC_SHA256, key=KEY).binary(
        price("sku-2", 5.0), type="price.updated", subject="sku-2", version=1)
    good = stamp(stamper, price("sku-3", 5.0), 1)
    corrupted = Stamped(good.key, good.value.replace(b"5.0", b"6.0"), good.headers, good.event_id)
    report = contract().check([unsigned, foreign, corrupted], now=NOW)
    assert [f.codes for f in report.rejected] == [
        ("integrity.missing",), ("source.not_allowed", "source.forged"), ("integrity.bad_mac",)]


# --------------------------------------------------------------------------- state, in order


def test_version_regression_inside_the_sample_is_caught(stamper: Stamper) -> None:
    """Stateful checks run in sample order: version 2 after version 3 of the same entity is a regression."""
    sample = [stamp(stamper, price("sku-1", 10.0 + v), v) for v in (1, 2, 3)]
    sample.append(stamp(stamper, price("sku-1", 11.5), 2))
    report = contract().check(sample, now=NOW)
    [finding] = report.rejected
    assert finding.index == 3
    assert finding.codes == ("version.regression",)
    assert "older than the verified version 3" in finding.reasons[0].detail


def test_duplicates_are_counted_not_rejected(stamper: Stamper) -> None:
    """A re-sent event is a duplicate: counted and listed, but the sample still passes."""
    first = stamp(stamper, price("sku-1", 10.0), 1)
    report = contract().check([first, first, first], now=NOW)
    assert report.passed
    assert report.outcomes == {Outcome.VERIFIED: 1, Outcome.DUPLICATE: 2}
    assert [f.index for f in report.duplicates] == [1, 2]
    assert report.duplicates[0].codes == ("id.duplicate",)


def test_a_quarantined_event_does_not_poison_state(stamper: Stamper) -> None:
    """State only advances on verified events, as live: after a rejected v5, v2 is verified, not a regression."""
    sample = [stamp(stamper, price("sku-1", 10.0), 1), stamp(stamper, price("sku-1", 0), 5),
              stamp(stamper, price("sku-1", 10.5), 2)]
    report = contract().check(sample, now=NOW)
    assert [(f.index, f.codes) for f in report.findings] == [(1, ("version.gap", "invariant.violated"))]
    assert report.findings[0].reasons[0].severity.value == "warn"


def test_snapshot_state_is_the_starting_point(stamper: Stamper) -> None:
    """Checking from a snapshot of earlier state catches a regression against a version verified before."""
    earlier = contract().check([stamp(stamper, price("sku-1", 10.0), 7)], now=NOW)
    assert earlier.passed and len(earlier.state) > 0
    later = [stamp(stamper, price("sku-1", 10.0), 6)]
    assert contract().check(later, now=NOW).passed
    report = contract().check(later, now=NOW, snapshot=earlier.state)
    assert [f.codes for f in report.rejected] == [("version.regression",)]
    # A snapshot written per partition (as read from changelogs) serves a file sample too.
    per_partition = Snapshot()
    for part, table in earlier.state.tables[ENTITIES].items():
        for key, value in table.items():
            per_partition.put(ENTITIES, part + 3, key, value)
    assert not contract().check(later, now=NOW, snapshot=per_partition).passed


def test_causal_buffer_holds_and_releases_in_order(stamper: Stamper) -> None:
    """On a route with a causal buffer an early event is held, then released once its dependency arrives."""
    text = CONFIG.replace("    require_checksum: true\n", "    require_checksum: true\n    causal: {buffer: true}\n")

    def ev(version: int, counter: int) -> Stamped:
        return stamper.binary(price("sku-1", 10.0 + version), type="price.updated", subject="sku-1",
                              version=version, time=NOW - 1, vclock=VectorClock({"pricing": counter}),
                              lamport=False)

    report = contract(text).check([ev(2, 2), ev(1, 1)], now=NOW)
    assert report.passed and report.outcomes == {Outcome.VERIFIED: 2}, report.format()
    waiting = contract(text).check([ev(1, 1), ev(3, 3)], now=NOW)
    assert waiting.passed and [f.outcome for f in waiting.findings] == [Outcome.HELD]
    expired = contract(text).check([ev(1, 1), ev(3, 3)], now=NOW, expire_held=True)
    assert [f.codes for f in expired.rejected] == [("causal.gap",)]


# --------------------------------------------------------------------------- inputs and setup


def test_records_come_in_many_shapes(stamper: Stamper) -> None:
    """RecordIn, stamped records, (key, value, headers) tuples, record dicts and plain events are all accepted."""
    s = stamp(stamper, price("sku-1", 10.0), 1)
    plain = Stamper("pricing").structured(price("sku-2", 3.0), type="price.updated", subject="sku-2", version=1)
    items: list[object] = [
        s,
        RecordIn(s.key, s.value, s.headers, "prices", 0, 0),
        (s.key, s.value, s.headers),
        {"key": "sku-1", "value": s.value.decode(), "headers": [[k, v.decode()] for k, v in s.headers]},
        orjson.loads(plain.value),
    ]
    report = contract().check(items, now=NOW)
    assert [f.outcome for f in report.findings] == [Outcome.DUPLICATE] * 3 + [Outcome.QUARANTINED]
    assert report.findings[-1].codes == ("integrity.missing",)  # sha256 is not the MAC the type requires


def test_jsonl_records_and_plain_events_are_parsed() -> None:
    """JSON lines hold records (text or base64 values, headers as pairs or an object) or plain events."""
    lines = [
        '{"key": "sku-1", "value": "{\\"a\\":1}", "headers": {"ce_id": "x"}}',
        "",
        json.dumps({"key_base64": base64.b64encode(b"k").decode(),
                    "value_base64": base64.b64encode(b"\x00\xff").decode(), "headers": [["h", {"base64": "AAE="}]]}),
        '{"data": {"sku": "sku-9", "price": 1}, "checksum": "00"}',
    ]
    parsed = list(parse_jsonl(lines, topic="prices", key_field="data.sku"))
    assert [n for n, _ in parsed] == [1, 3, 4]
    first, second, third = (r for _, r in parsed)
    assert first.key == b"sku-1" and first.value == b'{"a":1}' and first.headers == [("ce_id", b"x")]
    assert second.key == b"k" and second.value == b"\x00\xff" and second.headers == [("h", b"\x00\x01")]
    assert third.key == b"sku-9" and orjson.loads(third.value or b"")["data"]["price"] == 1
    with pytest.raises(SampleError, match="events:2: not JSON"):
        list(parse_jsonl(["{}", "{nope"], source="events"))


def test_unknown_route_and_missing_secret_are_explained(stamper: Stamper) -> None:
    """An unknown route is refused with the routes there are; a key without a secret is named, not fatal."""
    with pytest.raises(ContractError, match=r"no route 'nope'; routes: \['prices'\]"):
        contract_from_text(textwrap.dedent(CONFIG), "nope", environ={})
    bare = contract_from_text(textwrap.dedent(CONFIG), "prices", environ={})
    report = bare.check([stamp(stamper, price("sku-1", 10.0), 1)], now=NOW)
    [finding] = report.rejected
    assert finding.codes == ("integrity.unknown_key",)
    assert "TEST_KEY_PRICING_1" in finding.reasons[0].detail
    assert any("TEST_KEY_PRICING_1" in n for n in report.notes)
    from_env = contract_from_text(textwrap.dedent(CONFIG), "prices", environ={"TEST_KEY_PRICING_1": SECRET})
    assert from_env.check([stamp(stamper, price("sku-1", 10.0), 1)], now=NOW).passed


# --------------------------------------------------------------------------- diff


def test_diff_reports_newly_rejected_events_when_a_rule_is_tightened(stamper: Stamper) -> None:
    """Tightening price > 0 to price >= 1 newly rejects the 0.5 price and nothing else."""
    old = contract()
    new = contract(CONFIG.replace("data.price > 0", "data.price >= 1"))
    sample = [stamp(stamper, price("sku-1", 49.99), 1), stamp(stamper, price("sku-2", 0.5), 1),
              stamp(stamper, price("sku-3", 0), 1)]
    result = diff_contracts(old, new, sample, now=NOW)
    assert result.breaking
    [change] = result.newly_rejected
    assert (change.index, change.key, change.old_outcome, change.new_outcome) == (
        1, "sku-2", Outcome.VERIFIED, Outcome.QUARANTINED)
    assert [r.code.value for r in change.added] == ["invariant.violated"]
    assert len(result.changes) == 1  # sku-3 was rejected before and still is, for the same code
    assert "newly_rejected" in result.format()


def test_diff_reports_newly_warned_and_relaxed_events(stamper: Stamper) -> None:
    """A new warn-level rule shows as newly warned; dropping a rule shows as no longer rejected."""
    warn_rule = '          - {name: cheap, severity: warn, expr: "data.price >= 10"}\n'
    new = contract(CONFIG.replace("        rules:\n", "        rules:\n" + warn_rule))
    sample = [stamp(stamper, price("sku-1", 49.99), 1), stamp(stamper, price("sku-2", 5.0), 1)]
    result = diff_contracts(contract(), new, sample, now=NOW)
    assert not result.breaking
    assert [(c.index, c.kind) for c in result.changes] == [(1, "newly_warned")]
    relaxed = contract(CONFIG.replace('          - {name: price_positive, expr: "data.price > 0"}\n', ""))
    result = diff_contracts(contract(), relaxed, [stamp(stamper, price("sku-3", 0), 1)], now=NOW)
    assert [c.kind for c in result.changes] == ["no_longer_rejected"]


# --------------------------------------------------------------------------- verify again, downstream


def _verified(record: Stamped) -> list[tuple[str, bytes]]:
    """The headers byzguard puts on the verified topic for `record`."""
    cfg = contract().config
    result = Guard(cfg).process(RecordIn(record.key, record.value, record.headers, "prices", 0, 0),
                                cfg.routes[0], {"entities": {}, "lamports": {}, "causal": {}}, now=NOW)
    headers = result.first.verified_headers
    assert headers is not None
    return headers


def test_verify_again_accepts_an_untouched_verified_record(stamper: Stamper) -> None:
    """A verified record, byzguard headers and all, re-checks OK downstream with the producer's key."""
    record = stamp(stamper, price("sku-1", 10.0), 1)
    headers = _verified(record)
    assert any(k.startswith("byzguard_") for k, _ in headers)
    result = verify_again(record.key, record.value, headers, KeyRing({"pricing-1": KEY}))
    assert result.ok and bool(result) and result.describe() == "ok"
    assert (result.verdict, result.source, result.key_id) == ("pass", "pricing", "pricing-1")
    assert verify_record(record, KeyRing({"pricing-1": KEY}), sources={"pricing"}).ok


def test_verify_again_rejects_a_flipped_byte(stamper: Stamper) -> None:
    """One flipped bit of the value after verification fails the MAC (and a plain checksum) end to end."""
    record = stamp(stamper, price("sku-1", 10.0), 1)
    flipped = bytearray(record.value)
    flipped[5] ^= 0x01
    result = verify_again(record.key, bytes(flipped), _verified(record), KeyRing({"pricing-1": KEY}))
    assert result.codes == ("integrity.bad_mac",)
    plain = Stamper("pricing", algorithm=SHA256).binary(price("sku-1", 10.0), type="price.updated",
                                                          subject="sku-1")
    broken = plain.value.replace(b"10", b"11")
    assert verify_again(plain.key, broken, plain.headers, KeyRing()).codes == ("integrity.mismatch",)


def test_verify_again_rejects_a_mac_from_the_wrong_key(stamper: Stamper) -> None:
    """A MAC made with another secret under the same key id, or another source's key, does not verify."""
    impostor = Stamper("pricing", algorithm=HMAC_SHA256, key=Key("pricing-1", "pricing", b"wrong-secret"))
    record = stamp(impostor, price("sku-1", 10.0), 1)
    ring = KeyRing({"pricing-1": KEY, "orders-1": Key("orders-1", "orders", b"orders-secret")})
    assert verify_again(record.key, record.value, record.headers, ring).codes == ("integrity.bad_mac",)
    forged = stamp(Stamper("pricing", algorithm=HMAC_SHA256, key=ring.get("orders-1")), price("sku-1", 1.0), 1)
    assert verify_again(forged.key, forged.value, forged.headers, ring).codes == ("source.forged",)
    unknown = verify_again(record.key, record.value, record.headers, KeyRing())
    assert unknown.codes == ("integrity.unknown_key",)


def test_contract_refuses_a_configuration_with_a_repeated_key() -> None:
    """A producer's contract check reads the guard's file as the guard does: a second `routes:` is refused with
    its line, never checked against the last block only."""
    from byzguard.contract.check import contract_from_text
    from byzguard.errors import ConfigError
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: duplicate key 'routes'"):
        contract_from_text(CONFIG + "\nroutes: []\n", source_path="c.yaml", secrets={"pricing-1": "s"})


ARTICLE_CONFIG = """
defaults: {max_skew: 5s, max_age: 24h}
sources:
  web-shop: {forms: [value-only]}
routes:
  - name: prices
    inputs: [{topic: prices.web, source: web-shop}]
    verified_topic: prices.verified
    quarantine_topic: prices.quarantine
    default_type: price.updated
    require_checksum: true
    types:
      price.updated:
        sources: [web-shop]
"""


def test_a_headerless_producer_sample_names_its_form_before_deploy() -> None:
    """A JavaScript producer's {data, checksum} sample on a topic that declares its source: the canonical one
    passes with the legacy-form warning, the one with integer-like keys is integrity.noncanonical."""
    import hashlib

    from byzguard.jcs import canonicalize, js_sorted
    good = {"sku": "sku-1", "price": 5.0}
    keyed = {"sku": "sku-2", "price": 6.0, "sizes": {"9": 1, "10": 2}}
    sample = [{"data": good, "checksum": hashlib.sha256(canonicalize(good)).hexdigest()},
              {"data": keyed, "checksum": hashlib.sha256(js_sorted(keyed)).hexdigest()}]
    report = contract(ARTICLE_CONFIG).check(sample, now=NOW, key_field="data.sku")
    assert [(f.key, f.codes) for f in report.findings] == [("sku-1", ("integrity.legacy_form",)),
                                                           ("sku-2", ("integrity.noncanonical",))]
    assert "js-sorted" in report.findings[1].reasons[0].detail
