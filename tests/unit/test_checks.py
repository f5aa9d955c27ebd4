"""Every check of the catalogue: the event that trips it, with its stable code, and the event that must not."""

from __future__ import annotations

import hashlib
import hmac

import orjson
import pytest

from byzguard import integrity
from byzguard.clocks import VectorClock
from byzguard.guard import RecordIn
from byzguard.integrity import HMAC_SHA256, XXH3_128, Key, digest
from byzguard.routing import H_REASONS, H_VERDICT
from byzguard.stamp import Stamped, Stamper, seed_checksum_event
from byzguard.state import EntityState, id_hash
from byzguard.verdict import Code, Outcome, Severity

from .conftest import PRICING_KEY, Harness

NOW = 1_800_000_000.0
PRICE = {"price": 49.99, "currency": "USD"}


def harness_writes_entity(h: Harness) -> bool:
    """Whether the last record processed wrote entity state."""
    return any(table == "entities" for table, _ in h.last.writes)


def codes(routed: object) -> list[str]:
    """The reason codes of a routed record."""
    return [r.code.value for r in routed.decision.reasons]  # type: ignore[attr-defined]


def price_event(stamper: Stamper, version: int, price: float = 49.99, **kw: object) -> Stamped:
    """A clean binary-mode price event for sku-1."""
    return stamper.binary({"price": price, "currency": "USD"}, type="price.updated", subject="sku-1",
                          version=version, time=NOW, **kw)  # type: ignore[arg-type]


def send(h: Harness, s: Stamped, now: float = NOW):  # type: ignore[no-untyped-def]
    """Feed a stamped record to the harness."""
    return h.feed(s.key, s.value, s.headers, now=now)


# --- clean traffic ---------------------------------------------------------------------------------------

def test_clean_stream_is_verified(harness: Harness) -> None:
    """A stream of clean, increasing versions from an allowed source is verified with no reasons."""
    stamper = Stamper("pricing")
    for version in range(1, 6):
        routed = send(harness, price_event(stamper, version, price=49.99 + version))
        assert routed.decision.outcome is Outcome.VERIFIED, codes(routed)
        assert dict(routed.verified_headers or [])[H_VERDICT] == b"pass"
        assert routed.quarantine_headers is None


def test_every_mode_and_algorithm_verifies() -> None:
    """Binary and structured mode with sha256, xxh3-128 and hmac-sha256 all verify when untouched."""
    for algorithm, key in (("sha256", None), (XXH3_128, None), (HMAC_SHA256, PRICING_KEY)):
        for mode in ("binary", "structured"):
            h = Harness()
            stamper = Stamper("pricing", algorithm=algorithm, key=key)
            make = stamper.binary if mode == "binary" else stamper.structured
            routed = send(h, make(PRICE, type="price.updated", subject="sku-1", version=1, time=NOW))
            assert routed.decision.outcome is Outcome.VERIFIED, (algorithm, mode, codes(routed))


# --- decode ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, headers, code", [
    (b"\x00\xffnot json", [], Code.DECODE_MALFORMED),
    (b"[1,2,3]", [], Code.DECODE_UNSUPPORTED),
    (b'{"hello": "world"}', [], Code.DECODE_UNSUPPORTED),
    (b"", [], Code.DECODE_UNSUPPORTED),
    (b"{}", [("ce_specversion", b"0.3"), ("ce_id", b"1"), ("ce_source", b"s")], Code.DECODE_UNSUPPORTED),
    (b"{}", [("ce_specversion", b"1.0"), ("ce_source", b"s")], Code.DECODE_MALFORMED),
    (b"{}", [("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"pricing"),
             ("ce_entityversion", b"-3")], Code.DECODE_MALFORMED),
])
def test_undecodable_records_are_quarantined_with_their_code(
    harness: Harness, value: bytes, headers: list[tuple[str, bytes]], code: Code
) -> None:
    """A record that cannot be read is quarantined with a decode code and its bytes, never forwarded."""
    routed = harness.feed(b"sku-1", value, headers, now=NOW)
    assert routed.decision.outcome is Outcome.QUARANTINED
    assert codes(routed) == [code.value]
    assert routed.verified_headers is None


def test_key_not_matching_subject_is_refused(harness: Harness) -> None:
    """A record keyed by something other than its entity id is refused: its state lives elsewhere."""
    s = price_event(Stamper("pricing"), 1)
    routed = harness.feed(b"sku-2", s.value, s.headers, now=NOW)
    assert codes(routed) == ["decode.key_mismatch"]


# --- integrity -------------------------------------------------------------------------------------------

def test_flipped_byte_is_an_integrity_mismatch(harness: Harness) -> None:
    """Silent corruption: one byte changed after the checksum was computed."""
    s = price_event(Stamper("pricing"), 1)
    corrupted = s.value.replace(b"49.99", b"49.98")
    routed = harness.feed(s.key, corrupted, s.headers, now=NOW)
    assert codes(routed) == ["integrity.mismatch"]
    assert routed.decision.outcome is Outcome.QUARANTINED


def test_seed_checksum_shape_verifies_and_detects_corruption(harness_factory) -> None:  # type: ignore[no-untyped-def]
    """The seed's {data, checksum} shape of a source declared to use the value-only form passes untouched,
    with the legacy-form warning (its checksum binds no attribute), and is caught when data changes."""
    from .conftest import BASE_CONFIG
    harness = harness_factory(BASE_CONFIG + "sources:\n  pricing: {forms: [value-only]}\n")
    value = seed_checksum_event({"price": 49.99, "currency": "USD"})
    routed = harness.feed(b"sku-9", value, [("ce_source", b"pricing")], now=NOW)
    assert routed.decision.outcome is Outcome.WARNED and codes(routed) == ["integrity.legacy_form"]
    assert routed.decision.reasons[0].severity is Severity.WARN
    bad = value.replace(b"49.99", b"4.999")
    assert codes(harness.feed(b"sku-9", bad, [("ce_source", b"pricing")], now=NOW)) == ["integrity.mismatch"]


def test_seed_checksum_shape_of_a_source_not_declared_is_refused_as_unbound(harness: Harness) -> None:
    """The same {data, checksum} record from a source that may use only the bound form is refused."""
    value = seed_checksum_event({"price": 49.99, "currency": "USD"})
    routed = harness.feed(b"sku-9", value, [("ce_source", b"pricing")], now=NOW)
    assert routed.decision.outcome is Outcome.QUARANTINED and codes(routed) == ["integrity.unbound"]


def test_missing_checksum_only_matters_when_required(harness_factory) -> None:  # type: ignore[no-untyped-def]
    """integrity.missing trips on a route that requires a checksum, and not on one that does not."""
    event = b'{"specversion":"1.0","id":"e1","source":"pricing","type":"price.updated","subject":"a",' \
            b'"data":{"price":1}}'
    assert harness_factory().feed(b"a", event, now=NOW).decision.outcome is Outcome.VERIFIED
    from .conftest import BASE_CONFIG
    strict = harness_factory(BASE_CONFIG.replace("default_type: price.updated",
                                                 "default_type: price.updated\n    require_checksum: true"))
    assert codes(strict.feed(b"a", event, now=NOW)) == ["integrity.missing"]


def test_unknown_algorithm(harness: Harness) -> None:
    """A checksum algorithm byzguard does not know is refused, not skipped."""
    s = price_event(Stamper("pricing"), 1)
    headers = [(k, b"md5" if k == "ce_checksumalg" else v) for k, v in s.headers]
    assert codes(harness.feed(s.key, s.value, headers, now=NOW)) == ["integrity.unknown_algorithm"]


def test_unknown_key_and_bad_mac(harness: Harness) -> None:
    """A MAC under a key id not in the key ring, or one made with the wrong secret, does not pass."""
    rogue = Stamper("pricing", algorithm=HMAC_SHA256, key=Key("nope", "pricing", b"x"))
    assert codes(send(harness, price_event(rogue, 1))) == ["integrity.unknown_key"]
    wrong_secret = Stamper("pricing", algorithm=HMAC_SHA256, key=Key("pricing-1", "pricing", b"guess"))
    assert codes(send(harness, price_event(wrong_secret, 1))) == ["integrity.bad_mac"]


# --- authorization ---------------------------------------------------------------------------------------

def test_source_not_allowed(harness: Harness) -> None:
    """A source that may not emit the type is refused; an allowed one passes."""
    assert codes(send(harness, price_event(Stamper("inventory"), 1))) == ["source.not_allowed"]
    assert send(harness, price_event(Stamper("orders"), 1)).decision.outcome is Outcome.VERIFIED


def test_mac_with_another_sources_key_is_a_forgery(harness: Harness) -> None:
    """orders signs with its own valid key but claims to be pricing: a forgery, not a pass."""
    from .conftest import ORDERS_KEY
    forger = Stamper("pricing", algorithm=HMAC_SHA256, key=ORDERS_KEY)
    assert codes(send(harness, price_event(forger, 1))) == ["source.forged"]


def test_type_that_requires_a_mac(harness: Harness) -> None:
    """A type with key_ids refuses a plain checksum and keys not listed, and accepts its own key."""
    plain = Stamper("pricing").binary({"x": 1}, type="signed.thing", subject="t", version=1)
    assert codes(send(harness, plain)) == ["integrity.missing"]
    signed = Stamper("pricing", algorithm=HMAC_SHA256, key=PRICING_KEY)
    ok = signed.binary({"x": 1}, type="signed.thing", subject="t", version=1)
    assert send(harness, ok).decision.outcome is Outcome.VERIFIED


# --- idempotency -----------------------------------------------------------------------------------------

def test_duplicate_is_dropped_and_counted(harness: Harness) -> None:
    """The same event delivered twice: the second is a duplicate, sent nowhere."""
    s = price_event(Stamper("pricing"), 1)
    assert send(harness, s).decision.outcome is Outcome.VERIFIED
    again = send(harness, s)
    assert again.decision.outcome is Outcome.DUPLICATE
    assert again.verified_headers is None and again.quarantine_headers is None
    assert codes(again) == ["id.duplicate"]


def test_id_reused_for_different_content(harness: Harness) -> None:
    """The same event id with different content is quarantined as id.reused."""
    stamper = Stamper("pricing")
    send(harness, price_event(stamper, 1, event_id="e-1"))
    routed = send(harness, price_event(stamper, 2, price=50.5, event_id="e-1"))
    assert "id.reused" in codes(routed)
    assert routed.decision.outcome is Outcome.QUARANTINED


def test_same_content_under_an_old_id_with_a_new_version_is_id_reuse(harness: Harness) -> None:
    """The old id on the next version, with data identical to the first (a price that did not move): a new event
    under an old id, not a re-send of the first. Dropping it as a duplicate would lose the version.
    (The detection benchmark's fault injector made one such event in 100,000 and it went unaccounted.)"""
    stamper = Stamper("pricing")
    send(harness, price_event(stamper, 5, event_id="e-1"))
    routed = send(harness, price_event(stamper, 6, event_id="e-1"))
    assert codes(routed) == ["id.reused"]
    assert routed.decision.outcome is Outcome.QUARANTINED
    assert "already used for version 5; this is version 6" in routed.decision.reasons[0].detail


def test_same_content_under_an_old_id_without_its_version_is_id_reuse(harness: Harness) -> None:
    """A record that drops the version its id was verified with is not a byte-identical re-send either."""
    stamper = Stamper("pricing")
    send(harness, price_event(stamper, 5, event_id="e-1"))
    unversioned = stamper.binary(PRICE, type="price.updated", subject="sku-1", time=NOW, event_id="e-1")
    routed = send(harness, unversioned)
    assert codes(routed) == ["id.reused"]
    assert "this is an event without a version" in routed.decision.reasons[0].detail


def test_an_id_kept_before_versions_were_matches_on_content_alone(harness: Harness) -> None:
    """State written by an older byzguard keeps ids without their version: a re-send is still a duplicate."""
    stamper = Stamper("pricing")
    first = price_event(stamper, 5, event_id="e-1")
    send(harness, first)
    (key, raw), = harness.entities.items()
    state = EntityState.from_bytes(raw)
    assert state.recent[0].version == 5
    # The orjson list format, with entries of [id, content hash, seen at]: the older layout.
    harness.entities[key] = orjson.dumps([
        1, state.version, state.vclock.to_header().decode() if state.vclock else None, state.content_hash.hex(),
        state.last_good.decode("latin-1"), state.last_good_type, state.verified_at, state.event_time,
        [["e-1", state.content_hash.hex(), state.recent[0].seen_at]]])
    (seen,) = EntityState.from_bytes(harness.entities[key]).recent
    assert (seen.id_hash, seen.version) == (id_hash("e-1"), None)
    assert send(harness, first).decision.outcome is Outcome.DUPLICATE


def test_duplicate_window_expires(harness: Harness) -> None:
    """Ids older than the idempotency window are forgotten: reusing one for a newer version then passes."""
    stamper = Stamper("pricing")
    send(harness, price_event(stamper, 1, event_id="e-1"))
    within = send(harness, price_event(stamper, 2, price=50.0, event_id="e-1"), now=NOW + 60)
    assert "id.reused" in codes(within)
    later = NOW + 2 * 86_400
    after = send(harness, price_event(stamper, 2, price=50.0, event_id="e-1"), now=later)
    assert "id.reused" not in codes(after)


def test_same_version_same_content_under_new_id_is_a_duplicate(harness: Harness) -> None:
    """A producer retry that minted a new id for the same version and content is a duplicate, not a conflict."""
    stamper = Stamper("pricing")
    send(harness, price_event(stamper, 1, event_id="a"))
    assert send(harness, price_event(stamper, 1, event_id="b")).decision.outcome is Outcome.DUPLICATE


# --- version ---------------------------------------------------------------------------------------------

def test_version_regression_stale_cache(harness: Harness) -> None:
    """The stale-cache failure: an older version re-sent after a newer one was verified."""
    stamper = Stamper("pricing")
    send(harness, price_event(stamper, 5))
    send(harness, price_event(stamper, 6, price=50.0))
    routed = send(harness, price_event(stamper, 4, price=40.0))
    assert codes(routed) == ["version.regression"]
    assert routed.decision.outcome is Outcome.QUARANTINED


def test_version_conflict_and_gap(harness: Harness) -> None:
    """Equal version with other content is a conflict; a skipped version only warns by default."""
    stamper = Stamper("pricing")
    send(harness, price_event(stamper, 1))
    assert "version.conflict" in codes(send(harness, price_event(stamper, 1, price=48.0)))
    gap = send(harness, price_event(stamper, 4, price=48.0))
    assert codes(gap) == ["version.gap"]
    assert gap.decision.outcome is Outcome.WARNED
    assert dict(gap.verified_headers or [])[H_VERDICT] == b"warn"
    assert orjson.loads(dict(gap.verified_headers or [])[H_REASONS])[0]["code"] == "version.gap"


def test_quarantined_event_never_updates_state(harness: Harness) -> None:
    """After a rejected event, the entity's verified version is unchanged: bad data never poisons state."""
    stamper = Stamper("pricing")
    send(harness, price_event(stamper, 3))
    send(harness, price_event(stamper, 9, price=-1.0))  # rejected by price_positive
    assert send(harness, price_event(stamper, 4, price=49.0)).decision.outcome is Outcome.VERIFIED


# --- causal ----------------------------------------------------------------------------------------------

def test_lamport_regression_per_source(harness: Harness) -> None:
    """A source whose Lamport time goes backwards is caught, across entities of the partition."""
    stamper = Stamper("pricing", lamport=10, clock=None)
    send(harness, price_event(stamper, 1))
    stamper.lamport = 3
    routed = send(harness, stamper.binary(PRICE, type="price.updated", subject="sku-2", version=1, time=NOW))
    assert codes(routed) == ["lamport.regression"]
    other = Stamper("orders", lamport=1)
    assert send(harness, other.binary(PRICE, type="price.updated", subject="sku-3", version=1, time=NOW)) \
        .decision.outcome is Outcome.VERIFIED


class FakeClock:
    """A wall clock for producers that the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_replicas_of_one_source_never_regress(harness: Harness) -> None:
    """Two replicas of one source whose hybrid clocks interleave (one 2 s behind) are all verified."""
    ahead, behind = FakeClock(NOW), FakeClock(NOW - 2)
    a, b = Stamper("pricing", clock=ahead), Stamper("pricing", clock=behind)
    for n in range(20):
        for replica, clock in ((a, ahead), (b, behind)):
            clock.now += 0.001
            routed = send(harness, replica.binary(PRICE, type="price.updated", subject=f"sku-{n}-{id(replica)}",
                                                  version=1, time=NOW))
            assert routed.decision.outcome is Outcome.VERIFIED, codes(routed)


def test_a_restarted_producer_does_not_regress(harness: Harness) -> None:
    """A producer process that restarts (a new Stamper, its wall clock even 1 s behind) is verified."""
    clock = FakeClock(NOW)
    first = Stamper("pricing", clock=clock)
    for n in range(5):
        assert send(harness, first.binary(PRICE, type="price.updated", subject=f"sku-{n}", version=1,
                                          time=NOW)).decision.outcome is Outcome.VERIFIED
    clock.now -= 1.0  # the new process's wall clock is behind the old one's
    restarted = Stamper("pricing", clock=clock)
    routed = send(harness, restarted.binary(PRICE, type="price.updated", subject="sku-9", version=1, time=NOW))
    assert routed.decision.outcome is Outcome.VERIFIED, codes(routed)


def test_stable_instance_keeps_its_mark_across_restarts(harness: Harness) -> None:
    """A named instance's hybrid clock starts above what the same instance sent before it restarted."""
    clock = FakeClock(NOW)
    for run in range(3):
        stamper = Stamper("pricing", instance="pricing-0", clock=clock)
        for n in range(3):
            clock.now += 0.000_001  # more events than microseconds: the counter part carries on
            routed = send(harness, stamper.binary(PRICE, type="price.updated", subject=f"sku-{run}-{n}",
                                                  version=1, time=NOW))
            assert routed.decision.outcome is Outcome.VERIFIED, codes(routed)
        clock.now += 0.5


def test_stale_replay_of_an_instance_is_a_lamport_regression(harness: Harness) -> None:
    """An old event of a replica re-sent after newer ones (a stale replay) is caught as lamport.regression."""
    clock = FakeClock(NOW)
    replica = Stamper("pricing", clock=clock)
    old = replica.binary(PRICE, type="price.updated", subject="sku-old", version=1, time=NOW)
    send(harness, replica.binary(PRICE, type="price.updated", subject="sku-0", version=1, time=NOW))
    clock.now += 1
    send(harness, replica.binary(PRICE, type="price.updated", subject="sku-1", version=1, time=NOW))
    routed = send(harness, old)
    assert codes(routed) == ["lamport.regression"]
    assert f"instance {replica.instance!r}" in routed.decision.reasons[0].detail


def test_lamport_instance_must_be_short_and_printable() -> None:
    """A ce_lamportinstance that is empty, spaced, a control character or over 64 characters is malformed."""
    h = Harness()
    for bad in (b"", b"a b", b"a\x00b", b"x" * 65, b"\xff"):
        stamped = Stamper("pricing", instance=None).binary(PRICE, type="price.updated", subject="sku-1",
                                                            version=1, time=NOW)
        routed = send(h, Stamped(stamped.key, stamped.value, [*stamped.headers, ("ce_lamportinstance", bad)],
                                 stamped.event_id))
        assert codes(routed) == ["decode.malformed"], bad


def test_vector_clock_stale_split_brain_read(harness: Harness) -> None:
    """A write based on a replica that had not seen the verified write: dominated clock, vclock.stale."""
    stamper = Stamper("pricing")
    send(harness, price_event(stamper, 1, vclock=VectorClock.from_header("a=2,b=1")))
    routed = send(harness, price_event(stamper, 2, price=49.0, vclock=VectorClock.from_header("a=1,b=1")))
    assert codes(routed) == ["vclock.stale"]


def test_vector_clock_concurrent_and_after(harness: Harness) -> None:
    """Concurrent clocks are a conflict; a clock after the verified one passes."""
    stamper = Stamper("pricing")
    send(harness, price_event(stamper, 1, vclock=VectorClock.from_header("a=2,b=1")))
    assert codes(send(harness, price_event(stamper, 2, price=49.0, vclock=VectorClock.from_header("a=1,b=2")))) \
        == ["vclock.concurrent"]
    assert send(harness, price_event(stamper, 2, price=49.5, vclock=VectorClock.from_header("a=3,b=1"))) \
        .decision.outcome is Outcome.VERIFIED


# --- time ------------------------------------------------------------------------------------------------

def test_time_stale_and_future(harness: Harness) -> None:
    """Older than max age is stale; ahead of the skew tolerance is future; inside both passes."""
    stamper = Stamper("pricing")
    old = stamper.binary(PRICE, type="price.updated", subject="a", version=1, time=NOW - 25 * 3600)
    assert codes(send(harness, old)) == ["time.stale"]
    ahead = stamper.binary(PRICE, type="price.updated", subject="b", version=1, time=NOW + 30)
    assert codes(send(harness, ahead)) == ["time.future"]
    fine = stamper.binary(PRICE, type="price.updated", subject="c", version=1, time=NOW + 2)
    assert send(harness, fine).decision.outcome is Outcome.VERIFIED


# --- invariants ------------------------------------------------------------------------------------------

def test_invariant_reject_and_warn(harness: Harness) -> None:
    """price > 0 rejects a zero price; a 50% jump from the last verified price only warns."""
    stamper = Stamper("pricing")
    assert send(harness, price_event(stamper, 1, price=49.99)).decision.outcome is Outcome.VERIFIED
    zero = send(harness, price_event(stamper, 2, price=0.0))
    assert {(r.code.value, r.severity) for r in zero.decision.reasons} == {
        ("invariant.violated", Severity.REJECT), ("invariant.violated", Severity.WARN)}
    assert zero.decision.outcome is Outcome.QUARANTINED
    jump = send(harness, price_event(stamper, 2, price=0.01))
    assert codes(jump) == ["invariant.violated"]
    assert jump.decision.reasons[0].severity is Severity.WARN
    assert jump.decision.outcome is Outcome.WARNED


def test_invariant_runtime_error_is_a_verdict(harness: Harness) -> None:
    """Data without the field a rule reads gives invariant.error, not a crash."""
    routed = send(harness, Stamper("pricing").binary({"cost": 1}, type="price.updated", subject="z",
                                                      version=1, time=NOW))
    assert "invariant.error" in codes(routed)


# --- severities and policies -----------------------------------------------------------------------------

def test_check_off_and_code_override(harness_factory) -> None:  # type: ignore[no-untyped-def]
    """A check set to off is silent; a code override beats the check's severity."""
    from .conftest import BASE_CONFIG
    h = harness_factory(BASE_CONFIG.replace("  max_age: 24h", "  max_age: 24h\n  checks: {version: off}"))
    stamper = Stamper("pricing")
    send(h, price_event(stamper, 5))
    assert send(h, price_event(stamper, 2, price=49.0)).decision.outcome is Outcome.VERIFIED
    h2 = harness_factory(BASE_CONFIG.replace("  max_age: 24h",
                                             "  max_age: 24h\n  codes: {version.regression: warn}"))
    send(h2, price_event(stamper, 5))
    assert send(h2, price_event(stamper, 2, price=49.0)).decision.outcome is Outcome.WARNED


def test_fail_open_forwards_suspect_and_records_it(harness_factory) -> None:  # type: ignore[no-untyped-def]
    """On a fail_open route a rejected event is forwarded marked suspect and also recorded in quarantine."""
    from .conftest import BASE_CONFIG
    h = harness_factory(BASE_CONFIG.replace("  max_age: 24h", "  max_age: 24h\n  policy: fail_open"))
    routed = send(h, price_event(Stamper("pricing"), 1, price=0.0))
    assert routed.decision.outcome is Outcome.SUSPECT
    assert dict(routed.verified_headers or [])[H_VERDICT] == b"suspect"
    assert routed.quarantine_headers is not None
    assert not harness_writes_entity(h)


def test_clock_skew_is_judged_at_arrival_not_processing(harness: Harness) -> None:
    """A worker lagging 60 s still sees that an event was stamped 30 s ahead of its arrival at the broker."""
    ahead = Stamper("pricing").binary(PRICE, type="price.updated", subject="lag", version=1, time=NOW + 30)
    routed = harness.guard.process(RecordIn(ahead.key, ahead.value, ahead.headers, "in", 0, 1, NOW),
                                   harness.route, harness.state, now=NOW + 60).first
    assert [r.code.value for r in routed.decision.reasons] == ["time.future"]
    punctual = Stamper("pricing").binary(PRICE, type="price.updated", subject="lag2", version=1, time=NOW)
    routed = harness.guard.process(RecordIn(punctual.key, punctual.value, punctual.headers, "in", 0, 2, NOW),
                                   harness.route, harness.state, now=NOW + 60).first
    assert routed.decision.outcome is Outcome.VERIFIED


def test_hmac_digest_reuses_keyed_state_per_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keyed HMAC cache gives hmac.new's digest for every key, also past its bound (when it is cleared)."""
    monkeypatch.setattr(integrity, "_KEYED", {})
    monkeypatch.setattr(integrity, "_KEYED_MAX", 3)
    keys = [Key(f"k{i}", "pricing", f"secret-{i}".encode()) for i in range(5)]
    # Secrets shorter than, as long as and longer than SHA-256's block (a longer one is hashed first).
    keys += [Key(f"b{n}", "pricing", bytes(range(n))) for n in (1, 63, 64, 65, 200)]
    for _ in range(2):
        for key in keys:
            for content in (b"", b'{"price":1}', bytes(range(256)) * 3):
                expected = hmac.new(key.secret, content, hashlib.sha256).hexdigest()
                assert digest(HMAC_SHA256, content, key) == expected
    assert len(integrity._KEYED) <= 3
