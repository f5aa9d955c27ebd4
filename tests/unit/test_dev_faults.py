"""The fault injector (app.dev.faults): each class makes the intended defect with a hidden label, and the
scoring matches what came out against the ground truth."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest

from app.dev.faults import (
    ORDERS,
    PAYMENTS,
    PERMISSIONS,
    PRICING,
    QUARANTINE,
    SERVICES,
    SKEW_AHEAD,
    SKEW_BEHIND,
    SPECS,
    VERIFIED,
    Expect,
    Fate,
    FaultClass,
    Injection,
    Label,
    Observation,
    TrafficGenerator,
    fingerprint,
    observe,
    score,
)
from byzguard import config as guard_config
from byzguard.clocks import Order, VectorClock
from byzguard.envelope import (
    CE_ENTITYVERSION,
    CE_KEYID,
    CE_SOURCE,
    CE_TIME,
    CE_VECTORCLOCK,
    Envelope,
    decode,
    parse_time,
)
from byzguard.guard import Guard, RecordIn
from byzguard.integrity import BOUND, HMAC_SHA256, SHA256, Key, digest, form_input
from byzguard.stamp import Stamper
from byzguard.verdict import Code

REPO = Path(__file__).resolve().parents[2]
NOW = 1_790_000_000.0
PRICING_KEY = Key("pricing-1", PRICING, b"pricing-secret")
TOPICS = {PRICING: "prices", ORDERS: "orders", PAYMENTS: "payments", PERMISSIONS: "permissions"}


def make_generator(*, key: Key = PRICING_KEY, rate: float = 0.02, seed: int = 7, min_each: int = 1,
                   warmup: int = 60) -> TrafficGenerator:
    """A generator whose pricing service signs with `key` and the others use SHA-256."""
    stampers = {s: Stamper(s, algorithm=HMAC_SHA256, key=key) if s == PRICING else Stamper(s, algorithm=SHA256)
                for s in SERVICES}
    return TrafficGenerator(stampers, TOPICS, run_id="t1", rate=rate, seed=seed, forger_key=key,
                            min_each=min_each, warmup=warmup)


def warmed(n: int = 400) -> tuple[TrafficGenerator, list[Injection]]:
    """A generator with no faults of its own after `n` clean events."""
    gen = make_generator(rate=0.0, min_each=0)
    return gen, [gen.next(NOW + i) for i in range(n)]


def headers(injection: Injection) -> dict[str, bytes]:
    return dict(injection.record.headers)


def data(injection: Injection) -> dict[str, object]:
    out: dict[str, object] = orjson.loads(injection.record.value)
    return out


def clean_of(history: list[Injection], subject: str) -> list[Injection]:
    return [i for i in history if i.label.fault is None and i.label.subject == subject]


def test_clean_traffic_has_no_fault_labels_and_covers_the_four_services() -> None:
    """Without faults every record is labeled clean (expect pass) and all four services send."""
    _, history = warmed()
    assert all(i.label.fault is None and i.label.expect is Expect.PASS for i in history)
    assert {i.sender for i in history} == set(SERVICES)
    assert {i.topic for i in history} == set(TOPICS.values())


def test_labels_never_travel_in_the_record() -> None:
    """No header or value of an injected record names its fault class or expectation."""
    gen, _ = warmed()
    for fault in FaultClass:
        made = gen.inject(fault, NOW + 1000)
        assert made is not None, fault
        blob = made.record.value + b"".join(k.encode() + v for k, v in made.record.headers)
        assert fault.value.encode() not in blob and b"fault" not in blob


def test_stale_cache_resends_an_older_version_under_a_new_id() -> None:
    """stale_cache: an older verified version and its data, new event id, expecting version.regression."""
    gen, history = warmed()
    made = gen.inject(FaultClass.STALE_CACHE, NOW + 1000)
    assert made is not None and made.label.codes == {Code.VERSION_REGRESSION}
    versions = [int(headers(i)[CE_ENTITYVERSION]) for i in clean_of(history, made.label.subject)]
    stale = int(headers(made)[CE_ENTITYVERSION])
    assert stale < max(versions)
    assert made.label.event_id not in {i.label.event_id for i in history}


def test_split_brain_carries_a_clock_the_verified_one_dominates() -> None:
    """split_brain: the role event's vector clock is before (or equal to) the subject's latest clean clock."""
    gen, history = warmed()
    made = gen.inject(FaultClass.SPLIT_BRAIN, NOW + 1000)
    assert made is not None and made.label.codes == {Code.VCLOCK_STALE}
    latest = VectorClock.from_header(headers(clean_of(history, made.label.subject)[-1])[CE_VECTORCLOCK])
    stale = VectorClock.from_header(headers(made)[CE_VECTORCLOCK])
    assert stale.compare(latest) in (Order.BEFORE, Order.EQUAL)


def test_partial_write_is_an_order_whose_payment_never_comes() -> None:
    """partial_write: an order.confirmed for which no payment is ever sent, not even by flush()."""
    gen, history = warmed()
    made = gen.inject(FaultClass.PARTIAL_WRITE, NOW + 1000)
    assert made is not None and made.label.expect is Expect.AUDIT and made.label.event_type == "order.confirmed"
    later = [gen.next(NOW + 1001 + i) for i in range(50)] + gen.flush(NOW + 2000)
    payments = [i for i in later if i.label.event_type == "payment.captured"]
    assert payments and all(i.label.subject != made.label.subject for i in payments)
    # Clean orders all get their payment once the generator is flushed.
    orders = {i.label.subject for i in history + later if i.label.event_type == "order.confirmed"}
    paid = {i.label.subject for i in history + later if i.label.event_type == "payment.captured"}
    assert orders - paid == set()


def signed_bytes(made: Injection) -> bytes:
    """The bytes the record's checksum covers: its bound form's signature base (ENVELOPE.md)."""
    env = decode(made.record.key, made.record.value, made.record.headers)
    assert isinstance(env, Envelope) and env.form == BOUND
    covered = form_input(BOUND, env)
    assert covered is not None and covered.endswith(b"\ndata: " + made.record.value)
    return covered


def test_silent_corruption_flips_bytes_after_the_checksum() -> None:
    """silent_corruption: headers intact, the value no longer hashes (or MACs) to the stamped checksum."""
    gen, _ = warmed()
    for _ in range(10):
        made = gen.inject(FaultClass.SILENT_CORRUPTION, NOW + 1000)
        assert made is not None
        h = headers(made)
        algorithm = h["ce_checksumalg"].decode()
        key = PRICING_KEY if algorithm == HMAC_SHA256 else None
        assert digest(algorithm, signed_bytes(made), key) != h["ce_checksum"].decode()
        expected = Code.INTEGRITY_BAD_MAC if algorithm == HMAC_SHA256 else Code.INTEGRITY_MISMATCH
        assert made.label.codes == {expected}


@pytest.mark.parametrize(("fault", "offset", "code"), [
    (FaultClass.CLOCK_AHEAD, SKEW_AHEAD, Code.TIME_FUTURE),
    (FaultClass.CLOCK_BEHIND, -SKEW_BEHIND, Code.TIME_STALE),
])
def test_clock_skew_stamps_the_event_time_off_by_the_skew(fault: FaultClass, offset: float, code: Code) -> None:
    """clock_ahead / clock_behind: ce_time is the producer's skewed clock, 30 s ahead or two days behind."""
    gen, _ = warmed()
    made = gen.inject(fault, NOW + 1000)
    assert made is not None and made.label.codes == {code}
    assert parse_time(headers(made)[CE_TIME], CE_TIME) == pytest.approx(NOW + 1000 + offset, abs=0.001)


def test_duplicate_is_a_byte_identical_resend() -> None:
    """duplicate: key, value and headers equal to an earlier clean record; expected to be dropped."""
    gen, history = warmed()
    made = gen.inject(FaultClass.DUPLICATE, NOW + 1000)
    assert made is not None and made.label.expect is Expect.DROP
    assert any(i.record == made.record for i in history if i.label.fault is None)


def test_id_reuse_gives_new_content_an_earlier_event_id_of_the_same_entity() -> None:
    """id_reuse: the event id of the subject's last clean event, with different content."""
    gen, history = warmed()
    made = gen.inject(FaultClass.ID_REUSE, NOW + 1000)
    assert made is not None and made.label.codes == {Code.ID_REUSED}
    earlier = clean_of(history, made.label.subject)[-1]
    assert made.label.event_id == earlier.label.event_id
    assert made.record.value != earlier.record.value


def test_forged_source_is_signed_with_another_services_key() -> None:
    """forged_source: claims another source, MAC valid under the sender's own key id."""
    gen, _ = warmed()
    made = gen.inject(FaultClass.FORGED_SOURCE, NOW + 1000)
    assert made is not None and made.label.codes == {Code.SOURCE_FORGED}
    h = headers(made)
    assert h[CE_SOURCE].decode() != PRICING and h[CE_KEYID] == b"pricing-1" and made.sender == PRICING
    assert digest(HMAC_SHA256, signed_bytes(made), PRICING_KEY) == h["ce_checksum"].decode()


def test_forged_source_needs_a_key() -> None:
    """Without any MAC key the forged-source class is not injected at all."""
    stampers = {s: Stamper(s) for s in SERVICES}
    gen = TrafficGenerator(stampers, TOPICS, run_id="t1", forger_key=None)
    assert FaultClass.FORGED_SOURCE not in gen.classes


def test_implausible_price_drops_to_a_cent_from_a_plausible_price() -> None:
    """implausible_price: 0.01 after a verified price of at least 1; expected as a warning."""
    gen, history = warmed()
    made = gen.inject(FaultClass.IMPLAUSIBLE_PRICE, NOW + 1000)
    assert made is not None and made.label.expect is Expect.WARN
    assert data(made)["price"] == 0.01
    assert float(data(clean_of(history, made.label.subject)[-1])["price"]) >= 1  # type: ignore[arg-type]


def test_zero_price_for_an_unknown_product() -> None:
    """zero_price_unknown: price 0 for a product id never sent before; expected in quarantine."""
    gen, history = warmed()
    made = gen.inject(FaultClass.ZERO_PRICE_UNKNOWN, NOW + 1000)
    assert made is not None and made.label.expect is Expect.QUARANTINE
    assert data(made)["price"] == 0
    assert made.label.subject not in {i.label.subject for i in history}


def test_every_class_is_injected_at_least_min_each_times_and_near_its_rate() -> None:
    """Each class appears at least min_each times, and at about `rate` per event over a long run."""
    gen = make_generator(rate=0.02, min_each=2)
    for i in range(5000):
        gen.next(NOW + i)
    counts = Counter(lb.fault for lb in gen.labels if lb.fault is not None)
    assert set(counts) == set(FaultClass)
    assert min(counts.values()) >= 2
    for fault in FaultClass:
        assert 0.01 * 5000 < counts[fault] < 0.035 * 5000, (fault, counts[fault])


def test_same_seed_same_traffic() -> None:
    """The generator is deterministic for a seed (apart from the event times given to it)."""
    a, b = make_generator(seed=3), make_generator(seed=3)
    labels_a = [a.next(NOW + i).label for i in range(300)]
    labels_b = [b.next(NOW + i).label for i in range(300)]
    assert [(x.name, x.subject, x.expect) for x in labels_a] == [(x.name, x.subject, x.expect) for x in labels_b]


def test_a_too_high_rate_is_refused() -> None:
    """rate x classes above 1 is not a probability."""
    with pytest.raises(ValueError, match="probability"):
        make_generator(rate=0.1)


# ---------------------------------------------------------------------------------- through the real core


def test_the_documented_configuration_catches_every_per_event_class_with_its_code() -> None:
    """Fed through the pure Guard with byzguard.yaml, every per-event fault is caught with an expected code,
    every clean event passes, and nothing is lost."""
    cfg = guard_config.load(REPO / "byzguard.yaml", environ={"BYZGUARD_KEY_PRICING_1": "pricing-secret"})
    guard = Guard(cfg)
    key = cfg.keyring.get("pricing-1")
    assert key is not None
    gen = make_generator(key=key, rate=0.02, min_each=3, seed=11)
    state: dict[str, dict[str, dict[bytes, bytes]]] = {}
    observations: list[Observation] = []
    for i in range(3000):
        injection = gen.next(NOW + i * 0.01)
        route = cfg.route_for(injection.topic)
        tables = state.setdefault(route.name, {})
        record = injection.record
        sent_at = NOW + i * 0.01
        result = guard.process(RecordIn(record.key, record.value, record.headers, injection.topic, 0, i, sent_at),
                               route, _Tables(tables), now=sent_at + 0.5)
        for (table, k), v in result.writes.items():
            if v is None:
                tables.setdefault(table, {}).pop(k, None)
            else:
                tables.setdefault(table, {})[k] = v
        for routed in result.routed:
            for where, hdrs in ((VERIFIED, routed.verified_headers), (QUARANTINE, routed.quarantine_headers)):
                if hdrs is not None:
                    obs = observe(where, routed.record.value, hdrs)
                    assert obs is not None
                    observations.append(obs)
    drops = sum(1 for lb in gen.labels if lb.expect is Expect.DROP)
    report = score(gen.labels, observations, duplicates_counted=drops)
    for fault in FaultClass:
        row = report.rows[fault.value]
        assert row.sent >= 3, fault
        if SPECS[fault].expect is Expect.AUDIT:
            assert row.fates[Fate.PASSED] == row.sent  # per-event checks rightly see nothing wrong
        else:
            assert row.caught == row.sent, (fault, dict(row.fates), dict(row.codes_seen))
    assert report.clean.fates[Fate.PASSED] == report.clean.sent
    assert report.false_positives() == 0 and report.unaccounted() == 0 and report.extra == 0


class _Tables(dict[str, "_Table"]):
    """The Guard's state mapping over plain dicts, creating tables on first use."""

    def __init__(self, tables: dict[str, dict[bytes, bytes]]) -> None:
        super().__init__()
        self.tables = tables

    def __missing__(self, name: str) -> _Table:
        return _Table(self.tables.setdefault(name, {}))


class _Table:
    def __init__(self, rows: dict[bytes, bytes]) -> None:
        self.rows = rows

    def get(self, key: bytes) -> bytes | None:
        return self.rows.get(key)


# ---------------------------------------------------------------------------------- scoring


def label(seq: int, event_id: str, value: bytes, fault: FaultClass | None, **kw: object) -> Label:
    spec = SPECS[fault] if fault is not None else None
    fields: dict[str, object] = {
        "seq": seq, "event_id": event_id, "fingerprint": fingerprint(value), "service": PRICING, "topic": "prices",
        "event_type": "price.updated", "subject": "sku-1", "fault": fault,
        "expect": spec.expect if spec else Expect.PASS, "codes": spec.codes if spec else frozenset(), "detail": "",
    }
    fields.update(kw)
    return Label(**fields)  # type: ignore[arg-type]


def out(event_id: str, value: bytes, where: str = VERIFIED, verdict: str = "pass", *codes: str) -> Observation:
    return Observation(event_id, fingerprint(value), where, verdict, codes)


def test_score_matches_by_id_and_fingerprint_in_send_order() -> None:
    """An original and its duplicate share id and bytes: the first output is the original's, a second one
    means the duplicate was delivered again (missed)."""
    labels = [label(1, "e1", b"v", None), label(2, "e1", b"v", FaultClass.DUPLICATE)]
    once = score(labels, [out("e1", b"v")], duplicates_counted=1)
    assert once.fates == {1: Fate.PASSED, 2: Fate.CAUGHT}
    twice = score(labels, [out("e1", b"v"), out("e1", b"v")], duplicates_counted=0)
    assert twice.fates == {1: Fate.PASSED, 2: Fate.MISSED}


def test_score_counts_a_drop_beyond_the_duplicate_counter_as_unaccounted() -> None:
    """A duplicate missing from both topics is caught only as far as the guard's duplicate counter says."""
    labels = [label(1, "e1", b"v", None), label(2, "e1", b"v", FaultClass.DUPLICATE),
              label(3, "e2", b"w", None), label(4, "e2", b"w", FaultClass.DUPLICATE)]
    report = score(labels, [out("e1", b"v"), out("e2", b"w")], duplicates_counted=1)
    assert sorted(report.fates.values()) == sorted([Fate.PASSED, Fate.PASSED, Fate.CAUGHT, Fate.UNACCOUNTED])
    assert report.unaccounted() == 1


def test_score_tells_caught_other_code_missed_false_positive_and_unaccounted_apart() -> None:
    """Each fate: right code, wrong code, passed fault, flagged clean event, and a record with no output."""
    labels = [
        label(1, "a", b"1", FaultClass.STALE_CACHE),
        label(2, "b", b"2", FaultClass.STALE_CACHE),
        label(3, "c", b"3", FaultClass.STALE_CACHE),
        label(4, "d", b"4", None),
        label(5, "e", b"5", None),
        label(6, "f", b"6", FaultClass.IMPLAUSIBLE_PRICE),
    ]
    observations = [
        out("a", b"1", QUARANTINE, "reject", "version.regression"),
        out("b", b"2", QUARANTINE, "reject", "time.stale"),
        out("c", b"3"),
        out("d", b"4", VERIFIED, "warn", "version.gap"),
        out("f", b"6", VERIFIED, "warn", "invariant.violated"),
        out("zz", b"9"),
    ]
    report = score(labels, observations)
    assert report.fates == {1: Fate.CAUGHT, 2: Fate.OTHER_CODE, 3: Fate.MISSED, 4: Fate.FALSE_POSITIVE,
                            5: Fate.UNACCOUNTED, 6: Fate.CAUGHT}
    assert report.extra == 1 and report.false_positives() == 1 and report.unaccounted() == 1
    assert report.rows["stale_cache"].codes_seen == Counter({"version.regression": 1, "time.stale": 1})


def test_score_judges_partial_writes_by_the_audit_when_there_is_one() -> None:
    """A partial write passes per-event checks; with audit results it is caught only if its order was reported,
    and a clean order the audit reported is a false positive."""
    labels = [label(1, "o1", b"1", FaultClass.PARTIAL_WRITE, event_type="order.confirmed", subject="order-1"),
              label(2, "o2", b"2", None, event_type="order.confirmed", subject="order-2"),
              label(3, "o3", b"3", FaultClass.PARTIAL_WRITE, event_type="order.confirmed", subject="order-3")]
    observations = [out("o1", b"1"), out("o2", b"2"), out("o3", b"3")]
    without = score(labels, observations)
    assert without.fates == {1: Fate.PASSED, 2: Fate.PASSED, 3: Fate.PASSED}
    audited = score(labels, observations, audited={"order-1", "order-2"})
    assert audited.fates == {1: Fate.CAUGHT, 2: Fate.FALSE_POSITIVE, 3: Fate.MISSED}


def test_observe_reads_the_event_id_verdict_and_codes_of_an_output() -> None:
    """observe() turns a quarantine record's headers into an Observation; records without ce_id are ignored."""
    reasons = orjson.dumps([{"check": "version", "code": "version.regression", "severity": "reject", "detail": ""}])
    obs = observe(QUARANTINE, b"v", [("ce_id", b"e1"), ("byzguard_verdict", b"reject"), ("byzguard_reasons", reasons)])
    assert obs == Observation("e1", fingerprint(b"v"), QUARANTINE, "reject", ("version.regression",))
    assert observe(VERIFIED, b"v", [("byzguard_verdict", b"pass")]) is None

