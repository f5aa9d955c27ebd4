"""Cross-stream audits, pure core: field paths, the windowed join, window expiry, agreement, configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from byzguard import config as guard_config
from byzguard.audit import (
    MAX_JOIN_KEY_CHARS,
    AgreementWindow,
    AuditRule,
    AuditSide,
    Check,
    FieldPath,
    JoinState,
    Kind,
    Observation,
    Require,
    Side,
    Watermark,
    audit_batch,
    event_time,
    expire,
    observation_of,
    observe,
    values_agree,
)
from byzguard.errors import ConfigError

REPO = Path(__file__).parents[2]
T0 = 1_800_000_000.0


def rule(*, within: float = 600.0, require: Require = Require.LEFT, tolerance: float = 0.0,
         values: bool = True) -> AuditRule:
    return AuditRule(
        "orders_paid",
        AuditSide("orders", "orders.verified", "order.confirmed", FieldPath.parse("data.paymentId"),
                  FieldPath.parse("data.total") if values else None),
        AuditSide("payments", "orders.verified", "payment.captured", FieldPath.parse("data.paymentId"),
                  FieldPath.parse("data.amount") if values else None),
        within, require=require, tolerance=tolerance,
    )


def order(key: str, total: Any, at: float, *, entity: str | None = None, event_id: str | None = None) -> Observation:
    entity = entity or f"order-{key}"
    return Observation(Side.LEFT, key, entity, event_id or f"ev-{entity}-{at}", at, total, True)


def payment(key: str, amount: Any, at: float, *, entity: str | None = None,
            event_id: str | None = None) -> Observation:
    entity = entity or f"pay-{key}"
    return Observation(Side.RIGHT, key, entity, event_id or f"ev-{entity}-{at}", at, amount, True)


def run(r: AuditRule, *items: Observation, now: float | None = None) -> tuple[JoinState, list[Check]]:
    """Feed observations of one key in order, then expire at `now` (if given)."""
    state, checks = JoinState(), []
    for item in items:
        step = observe(r, state, item, now=item.at)
        state, checks = step.state, checks + step.checks
    if now is not None:
        step = expire(r, state, now=now)
        state, checks = step.state, checks + step.checks
    return state, checks


# ------------------------------------------------------------------------------------------ field paths and values


def test_field_paths_read_nested_data_lists_and_the_subject() -> None:
    """A path reads data fields (digits index lists) or the entity id; an absent field is not found."""
    data = {"payment": {"id": "p-1"}, "lines": [{"sku": "a"}, {"sku": "b"}]}
    assert FieldPath.parse("data.payment.id").extract(data, "o-1") == (True, "p-1")
    assert FieldPath.parse("data.lines.1.sku").extract(data, "o-1") == (True, "b")
    assert FieldPath.parse("subject").extract(data, "o-1") == (True, "o-1")
    assert FieldPath.parse("data.nope").extract(data, "o-1") == (False, None)
    assert FieldPath.parse("data.lines.7").extract(data, "o-1") == (False, None)


@pytest.mark.parametrize("text", ["total", "data.", "data..x", "event.id", "", "data total"])
def test_field_paths_other_than_subject_or_data_are_refused(text: str) -> None:
    """Only `subject` and `data.<field>...` are paths."""
    with pytest.raises(ValueError, match="not a field path"):
        FieldPath.parse(text)


@pytest.mark.parametrize("a, b, tolerance, agree", [
    (100, 100.0, 0.0, True),
    ("100.00", 100, 0.0, True),
    (0.1 + 0.2, 0.3, 0.0, True),
    (100, 99.99, 0.0, False),
    (100, 99.99, 0.01, True),
    ("EUR", "EUR", 0.0, True),
    ("EUR", "USD", 0.0, False),
    (True, 1, 0.0, False),
    (None, 0, 0.0, False),
])
def test_values_agree_numerically_within_the_tolerance_else_by_equality(a: Any, b: Any, tolerance: float,
                                                                        agree: bool) -> None:
    """Numbers and numeric strings compare as numbers (float noise absorbed), anything else by equality."""
    assert values_agree(a, b, tolerance) is agree


# ------------------------------------------------------------------------------------------ the join


def test_counterpart_within_the_window_with_the_same_value_passes() -> None:
    """An order and its payment of the same amount 5 minutes apart are one passed check."""
    state, checks = run(rule(), order("p1", 100, T0), payment("p1", 100, T0 + 300))
    assert [c.passed for c in checks] == [True]
    assert not state.lefts and not state.rights


def test_payment_before_the_order_also_counts() -> None:
    """The window is symmetric: a payment captured shortly before the order confirmation matches it."""
    _, checks = run(rule(), payment("p1", 100, T0), order("p1", 100, T0 + 30))
    assert [c.passed for c in checks] == [True]
    assert checks[0].subject.side is Side.LEFT


def test_amount_that_disagrees_is_a_mismatch_with_both_values() -> None:
    """A payment of 90 for an order of 100 is a mismatch naming both services and values (the seed's shape)."""
    _, checks = run(rule(), order("p1", 100, T0), payment("p1", 90, T0 + 1))
    (check,) = checks
    assert check.discrepancy is not None
    disc = check.discrepancy.to_dict()
    assert disc["kind"] == "mismatch" and disc["rule"] == "orders_paid" and disc["key"] == "p1"
    assert disc["entity"] == "order-p1"
    assert disc["serviceA"]["name"] == "orders" and disc["serviceA"]["value"] == 100
    assert disc["serviceB"]["name"] == "payments" and disc["serviceB"]["value"] == 90
    assert "data.total = 100" in disc["detail"] and "data.amount = 90" in disc["detail"]


def test_order_without_payment_is_missing_once_the_window_has_closed() -> None:
    """The partial write: no payment within the window is a `missing` discrepancy, not before the window ends."""
    r = rule(within=600)
    state, checks = run(r, order("p1", 100, T0), now=T0 + 599)
    assert checks == [] and len(state.lefts) == 1
    state, checks = run(r, order("p1", 100, T0), now=T0 + 601)
    (check,) = checks
    assert check.discrepancy is not None and check.discrepancy.kind is Kind.MISSING
    assert check.discrepancy.service_b == {"name": "payments", "type": "payment.captured", "value": None}
    assert state.empty


def test_payment_after_the_window_does_not_rescue_the_order() -> None:
    """A counterpart later than `within` is not paired; the order is still reported missing."""
    r = rule(within=600)
    _, checks = run(r, order("p1", 100, T0), payment("p1", 100, T0 + 601), now=T0 + 1300)
    assert [c.discrepancy.kind for c in checks if c.discrepancy] == [Kind.MISSING]
    assert len(checks) == 1


def test_unmatched_payment_is_forgotten_unless_both_directions_are_required() -> None:
    """With require: left a lone payment is no discrepancy; with require: both it is missing its order."""
    _, checks = run(rule(), payment("p1", 100, T0), now=T0 + 700)
    assert checks == []
    _, checks = run(rule(require=Require.BOTH), payment("p1", 100, T0), now=T0 + 700)
    (check,) = checks
    assert check.discrepancy is not None and check.discrepancy.service_a["value"] is None
    assert check.discrepancy.service_b["entity"] == "pay-p1"


def test_an_agreeing_counterpart_is_preferred_over_an_earlier_disagreeing_one() -> None:
    """Two payments wait for one key: the order pairs with the one of its amount, not simply the first."""
    _, checks = run(rule(), payment("p1", 90, T0, entity="pay-a"), payment("p1", 100, T0 + 1, entity="pay-b"),
                    order("p1", 100, T0 + 2))
    (check,) = checks
    assert check.passed and check.counterpart is not None and check.counterpart.entity == "pay-b"


def test_two_orders_on_one_payment_leave_one_missing() -> None:
    """A payment pairs once: a second order claiming the same payment id is missing its payment."""
    _, checks = run(rule(), order("p1", 100, T0, entity="o-1"), payment("p1", 100, T0 + 1),
                    order("p1", 100, T0 + 2, entity="o-2"), now=T0 + 1000)
    assert [(c.subject.entity, c.passed) for c in checks] == [("o-1", True), ("o-2", False)]


def test_redelivered_event_is_not_checked_twice() -> None:
    """The same event id again (a redelivery or replay) changes nothing, pending or paired."""
    o = order("p1", 100, T0, event_id="e-1")
    state, checks = run(rule(), o, o)
    assert checks == [] and len(state.lefts) == 1
    p = payment("p1", 100, T0 + 1, event_id="e-2")
    state, checks = run(rule(), o, p, p)
    assert len(checks) == 1


def test_restated_pending_order_keeps_its_window_and_takes_the_new_value() -> None:
    """A second order.confirmed of the same order while it waits replaces the first, window unchanged."""
    state, _ = run(rule(), order("p1", 100, T0, entity="o-1"), order("p1", 120, T0 + 60, entity="o-1"))
    (pending,) = state.lefts
    assert pending.value == 120 and pending.at == T0


def test_restated_paired_order_is_checked_again_only_when_its_value_changes() -> None:
    """An order restated with the same total needs no new check; with a new total it is rechecked."""
    r = rule()
    base = [order("p1", 100, T0, entity="o-1"), payment("p1", 100, T0 + 1)]
    _, checks = run(r, *base, order("p1", 100, T0 + 2, entity="o-1"))
    assert [c.passed for c in checks] == [True]
    _, checks = run(r, *base, order("p1", 150, T0 + 2, entity="o-1"))
    assert [c.passed for c in checks] == [True, False]
    assert checks[1].discrepancy is not None and checks[1].discrepancy.kind is Kind.MISMATCH


def test_presence_only_rule_checks_existence_not_values() -> None:
    """Without value paths any counterpart agrees, and a missing one is still missing."""
    _, checks = run(rule(values=False), order("p1", None, T0), payment("p1", 5, T0 + 1))
    assert [c.passed for c in checks] == [True]


def test_paired_entries_are_forgotten_after_their_window() -> None:
    """The join state of a key is empty once every window it remembers has closed."""
    r = rule(within=60)
    state, _ = run(r, order("p1", 100, T0), payment("p1", 100, T0 + 1))
    assert not state.empty and state.due(r.within) == T0 + 61
    assert expire(r, state, now=T0 + 62).state.empty


def test_join_state_round_trips_and_refuses_foreign_bytes() -> None:
    """The table value survives serialization; bytes of another format are a ValueError, not a crash."""
    state, _ = run(rule(), order("p1", 100, T0), payment("p1", 100, T0 + 1), order("p2", {"a": [1]}, T0 + 2))
    assert JoinState.from_bytes(state.to_bytes()) == state
    assert JoinState.from_bytes(None) == JoinState()
    for raw in (b"not json", b"[1, 2]", b'[99, [], [], []]'):
        with pytest.raises(ValueError):
            JoinState.from_bytes(raw)


# ------------------------------------------------------------------------------------------ records


def test_record_without_a_join_key_is_missing_at_once_for_a_subject_only() -> None:
    """An order with no paymentId can never be matched: reported right away; such a payment is ignored."""
    r = rule()
    item = observation_of(r, Side.LEFT, {"total": 5}, subject="o-9", event_id="e", at=T0)
    assert isinstance(item, Check) and item.discrepancy is not None
    assert item.discrepancy.kind is Kind.MISSING and "has no data.paymentId" in item.discrepancy.detail
    assert observation_of(r, Side.RIGHT, {"amount": 5}, subject="pay-9", event_id="e", at=T0) is None
    obs = observation_of(r, Side.LEFT, {"paymentId": 7, "total": 5}, subject="o-9", event_id="e", at=T0)
    assert isinstance(obs, Observation) and obs.key == "7" and obs.value == 5
    assert Observation.from_bytes(obs.to_bytes()) == obs


def test_observations_stay_small_whatever_the_record() -> None:
    """A join key over MAX_JOIN_KEY_CHARS is unusable (an order with one is missing at once); a long subject or
    event id is kept as its hash, so an observation of any verified record fits its repartition topic."""
    r = rule()
    item = observation_of(r, Side.LEFT, {"paymentId": "p" * (MAX_JOIN_KEY_CHARS + 1), "total": 5}, subject="o-9",
                          event_id="e", at=T0)
    assert isinstance(item, Check) and item.discrepancy is not None
    assert item.discrepancy.kind is Kind.MISSING and "has an unusable data.paymentId" in item.discrepancy.detail
    obs = observation_of(r, Side.LEFT, {"paymentId": "p" * MAX_JOIN_KEY_CHARS, "total": 5}, subject="o" * 500_000,
                         event_id="i" * 100_000, at=T0)
    assert isinstance(obs, Observation) and obs.key == "p" * MAX_JOIN_KEY_CHARS
    assert obs.entity.startswith("sha256:") and obs.event_id.startswith("sha256:")
    assert len(obs.to_bytes()) < 2 * MAX_JOIN_KEY_CHARS
    again = observation_of(r, Side.LEFT, {"paymentId": "p" * MAX_JOIN_KEY_CHARS, "total": 5},
                           subject="o" * 500_000, event_id="i" * 100_000, at=T0)
    assert isinstance(again, Observation) and again.event_id == obs.event_id  # a redelivery is still recognized


def test_sides_are_chosen_by_topic_and_type() -> None:
    """A record belongs to the side whose verified topic and event type it has."""
    r = rule()
    assert r.sides_of("orders.verified", "order.confirmed") == (Side.LEFT,)
    assert r.sides_of("orders.verified", "payment.captured") == (Side.RIGHT,)
    assert r.sides_of("prices.verified", "order.confirmed") == ()


# ------------------------------------------------------------------------------------------ clocks and rates


A = ("orders.verified", 0)
B = ("orders.verified", 1)
C = ("payments.verified", 0)


def test_the_watermark_is_the_least_progress_over_the_source_partitions_and_never_goes_back() -> None:
    """A join partition's watermark is the oldest of its sources' newest event times: a source whose records stop
    coming holds it however far the others go; an older record of a source does not rewind it."""
    mark = Watermark()
    mark.know([A, B])
    mark.observe(A, T0)
    assert mark.time is None  # B has said nothing yet
    mark.observe(B, T0 - 10)
    assert mark.time == T0 - 10
    mark.observe(A, T0 + 3600)  # A an hour on, B stalled: the windows stay open
    mark.observe(B, T0 - 20)
    assert mark.time == T0 - 10
    mark.observe(B, T0 + 50)
    assert mark.time == T0 + 50
    assert mark.behind() == [B]


def test_a_source_that_never_sent_anything_holds_the_watermark_until_it_is_drained() -> None:
    """Every source partition counts, not only those heard from: one with no observation holds the watermark until
    it is drained through a time (its quiet is then known to be real), which is its progress like an event time."""
    mark = Watermark()
    mark.know([A, B, C])
    mark.observe(A, T0)
    mark.observe(B, T0 + 5)
    assert mark.time is None and mark.behind() == [C]
    mark.drained(C, T0 + 30)
    assert mark.time == T0
    mark.drained(A, T0 + 40)
    mark.drained(C, T0 + 20)  # an older drain changes nothing
    assert mark.time == T0 + 5
    mark.observe(B, T0 + 60)
    assert mark.time == T0 + 30


def test_without_its_sources_known_the_watermark_stays_where_it_is() -> None:
    """Until the source partitions are looked up, no observation moves the watermark (fail closed: the sources
    heard from may not be all of them; windows close late, never early); a source heard from that the lookup did
    not name (a partition added since) counts too."""
    mark = Watermark(T0)
    mark.observe(None, T0 + 100)  # an observation that does not say where it comes from
    mark.observe(A, T0 + 100)
    mark.drained(B, T0 + 100)
    assert mark.time == T0
    mark.know([A])
    assert mark.time == T0 + 100
    mark.observe(C, T0 + 50)
    mark.observe(A, T0 + 200)
    assert mark.time == T0 + 100 and mark.behind() == [C]


@pytest.mark.parametrize(("time", "verified", "expected"), [
    (T0 - 30, T0, T0 - 30),  # the event's own time
    (None, T0, T0),  # no time in the envelope: when it was verified
    (T0 + 30, T0, T0),  # a producer clock ahead: never after it was verified
    (float("nan"), T0, T0),
    (float("-inf"), T0, T0),
])
def test_an_observation_is_timed_by_its_event_time_never_after_its_verification(
        time: float | None, verified: float, expected: float) -> None:
    """An observation's time is its envelope's time, bounded above by its verified record's timestamp, which also
    stands in for an absent or unusable one."""
    assert event_time(time, verified) == expected


def test_agreement_window_rolls_over() -> None:
    """The rate covers the checks of the last span only."""
    window = AgreementWindow(span=60, buckets=6)
    assert window.rate(T0) is None
    for passed in (True, True, True, False):
        window.record(passed, T0)
    assert window.rate(T0) == 0.75
    window.record(False, T0 + 61)
    assert window.counts(T0 + 61) == (1, 0)


def test_batch_audit_reports_discrepancies_agreement_and_open_windows() -> None:
    """Over a range: 2 of 4 orders agree, one mismatch, one missing, and an order still in its window is pending."""
    r = rule(within=60)
    items: list[Observation | Check] = [
        order("a", 10, T0), payment("a", 10, T0 + 5),
        payment("b", 20, T0 + 10), order("b", 20, T0 + 11),
        order("c", 30, T0 + 20), payment("c", 31, T0 + 21),
        order("d", 40, T0 + 30),
        order("e", 50, T0 + 100),  # its window is still open at `now`
        order("z", 1, T0 - 500), payment("z", 2, T0 - 499),  # before the range: read only as counterparts
    ]
    result = audit_batch(r, items, since=T0, until=T0 + 120, now=T0 + 120)
    assert (result.checks, result.passed, result.pending) == (4, 2, 1)
    assert result.agreement == 0.5 and not result.consistent
    assert [(d.key, d.kind) for d in result.discrepancies] == [("c", Kind.MISMATCH), ("d", Kind.MISSING)]
    assert result.to_dict()["discrepancies"][0]["serviceB"]["value"] == 31


# ------------------------------------------------------------------------------------------ configuration

ROUTES = """
keys:
  payments-1: {source: payments, secret_env: K}
routes:
  - name: orders
    inputs: [orders]
    verified_topic: orders.verified
    quarantine_topic: orders.quarantine
    partitions: 6
    types:
      order.confirmed: {sources: [orders]}
      payment.captured: {sources: [payments]}
"""

AUDIT = """
audits:
  - name: orders_paid
    left: {name: orders, topic: orders.verified, type: order.confirmed, key: data.paymentId, value: data.total}
    right: {name: payments, topic: orders.verified, type: payment.captured, key: data.paymentId, value: data.amount}
    within: 10m
"""


def test_audit_rules_compile_from_the_configuration() -> None:
    """An audits: entry becomes a rule with parsed paths, durations and defaults (partitions of the left route)."""
    cfg = guard_config.loads(ROUTES + AUDIT, environ={"K": "x"})
    r = cfg.audit("orders_paid")
    assert r is not None and r.within == 600 and r.grace == 5 and r.require is Require.LEFT
    assert r.left.key.text == "data.paymentId" and r.right.value is not None and r.right.value.text == "data.amount"
    assert r.partitions == 6 and r.discrepancies_topic == "audit.discrepancies"
    assert r.topics == ("orders.verified",)


def test_shipped_example_has_the_orders_payments_audit() -> None:
    """byzguard.yaml documents the orders/payments rule."""
    cfg = guard_config.load(REPO / "byzguard.yaml", environ={"BYZGUARD_KEY_PRICING_1": "x"})
    r = cfg.audit("orders_paid")
    assert r is not None and r.left.type == "order.confirmed" and r.right.type == "payment.captured"


@pytest.mark.parametrize("change, fault", [
    (("topic: orders.verified, type: order", "topic: orders, type: order"), "is not a route's verified_topic"),
    (("type: payment.captured", "type: payment.refunded"), "has no type 'payment.refunded'"),
    (("key: data.paymentId, value: data.amount", "key: data.paymentId, value: amount"), "not a field path"),
    (("type: payment.captured, key: data.paymentId", "type: order.confirmed, key: data.paymentId"),
     "read the same records"),
    (("within: 10m", "within: 0s"), "longer than 0s"),
    (("within: 10m", "within: soon"), "not a duration"),
    (("within: 10m", "within: 10m\n    discrepancies_topic: orders"), "is a route's topic"),
    (("within: 10m", "within: 10m\n    surprise: 1"), "Extra inputs are not permitted"),
])
def test_invalid_audit_rules_are_refused_with_the_field(change: tuple[str, str], fault: str) -> None:
    """A wrong audit rule is refused at start, saying what is wrong."""
    with pytest.raises(ConfigError, match=fault):
        guard_config.loads(ROUTES + AUDIT.replace(*change), environ={"K": "x"})


def test_an_audit_of_a_topic_that_a_route_reads_is_refused() -> None:
    """A verified topic that is also another route's input is read by that route's verify stream (one consumer
    group reads each topic once), so an audit of it would never see its records: refused at start."""
    chained = ROUTES + """  - name: billing
    inputs: [orders.verified]
    verified_topic: billing.verified
    quarantine_topic: billing.quarantine
    types:
      order.confirmed: {sources: [orders]}
"""
    with pytest.raises(ConfigError, match=r"topic 'orders\.verified' is also an input of route 'billing'"):
        guard_config.loads(chained + AUDIT, environ={"K": "x"})
    guard_config.loads(ROUTES + AUDIT, environ={"K": "x"})


def test_duplicate_audit_names_are_refused() -> None:
    """Audit names identify metrics and CLI runs, so they are unique."""
    twice = AUDIT + AUDIT.split("audits:\n", 1)[1]
    with pytest.raises(ConfigError, match="audit name 'orders_paid' is used twice"):
        guard_config.loads(ROUTES + twice, environ={"K": "x"})


def test_discrepancy_details_quote_at_most_quote_limit_characters() -> None:
    """A 100 KB join key or value is quoted in a discrepancy's detail in at most QUOTE_LIMIT characters each."""
    from byzguard.verdict import QUOTE_LIMIT
    huge = "k" * 100_000
    _, missing = run(rule(), order(huge, 10, T0), now=T0 + 700)
    _, differ = run(rule(), order("p-1", huge, T0, entity=huge), payment("p-1", 11, T0 + 1))
    details = [c.discrepancy.detail for c in (*missing, *differ) if c.discrepancy is not None]
    assert len(details) == 2 and all(len(d) < 3 * QUOTE_LIMIT and "…" in d for d in details), details
