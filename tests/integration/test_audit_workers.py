"""The audits' watermark across two workers of one app on a real broker: a worker stopped (SIGSTOP) or killed
(SIGKILL) with a backlog holds the join windows of the other worker its records feed, so no paid order is
reported `missing` while it is away, and an order never paid still is, once, after it is back (docs/audits.md,
Time)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from urllib.parse import urlsplit

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from app.runtime.membership import member_url
from byzguard.partitioner import partition_for
from byzguard.stamp import Stamped, Stamper
from tests.conftest import run_async
from tests.integration.test_audit import _audited, _metrics
from tests.integration.worker_harness import (
    PAYMENTS_KEY,
    Out,
    RouteNames,
    WorkerFactory,
    WorkerProcess,
    collect,
    input_group,
    produce,
    wait_caught_up,
)

pytestmark = pytest.mark.kafka

WINDOW = 4.0  # grace 1 s (test_audit.CONFIG)
#: Far longer than the SIGSTOP: the stopped worker keeps its partitions (no rebalance while it is stopped).
SESSION_TIMEOUT = 60.0
#: How long a worker is away: three times the window and grace.
AWAY = 15.0

TPs = set[tuple[str, int]]


async def _owners(bootstrap: str, group: str, workers: list[WorkerProcess], timeout: float = 60.0) -> dict[str, TPs]:
    """Per worker name, the topic partitions it owns in `group` once the group is stable with one member per
    worker, each owning some (members are told apart by the web URL in their metadata)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    by_port = {w.web_port: w.name for w in workers}
    try:
        deadline = time.monotonic() + timeout
        owned: dict[str, TPs] = {}
        while time.monotonic() < deadline:
            [response] = await admin.describe_consumer_groups([group])
            found = response.groups[0]
            state, members = found[2], found[5]
            owned = {}
            for member in members:
                url = member_url(member[-2])
                name = by_port.get(urlsplit(url).port or 0) if url else None
                assignment = ConsumerProtocolMemberAssignment.decode(member[-1]) if member[-1] else None
                if name is not None and assignment is not None:
                    owned[name] = {(topic, p) for topic, partitions in assignment.assignment for p in partitions}
            if state == "Stable" and len(owned) == len(workers) and all(owned.values()):
                return owned
            await asyncio.sleep(0.5)
        raise AssertionError(f"group {group} did not settle on {len(workers)} members: {owned}")
    finally:
        await admin.close()


def _two_workers(factory: WorkerFactory, session_timeout: float, guarantee: str = "exactly_once",
                 ) -> tuple[RouteNames, str, WorkerProcess, WorkerProcess]:
    """Two started workers of one app (under `guarantee`, both audit rules, `WINDOW` windows) whose group sessions
    time out after `session_timeout`, both ready: route, audit topic, the two workers."""
    names, discrepancies = _audited(factory, WINDOW, guarantee)
    workers = []
    for name in ("one", "two"):
        worker = factory.new_worker(name)
        worker.env["BYZGUARD_SESSION_TIMEOUT"] = str(session_timeout)
        worker.start()
        worker.wait_ready(90)
        workers.append(worker)
    one, two = workers
    return names, discrepancies, one, two


class Orders:
    """Paid orders and unpaid ones with chosen input partitions (by subject) and join partitions (by payment id)."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.orders = Stamper("orders")
        self.payments = Stamper("payments", algorithm="hmac-sha256", key=PAYMENTS_KEY)
        self.n = 0
        self.paid: list[str] = []  # the join keys of every paid order

    def _name(self, partitions: set[int], count: int, prefix: str) -> str:
        while True:
            self.n += 1
            name = f"{self.run}-{prefix}{self.n}"
            if partition_for(name.encode(), count) in partitions:
                return name

    def order(self, key: str, total: float, at: float, *, inputs: set[int] | None = None) -> Stamped:
        subject = self._name(inputs, 4, "o") if inputs is not None else f"{key}-o"
        return self.orders.binary({"paymentId": key, "total": total}, type="order.confirmed", subject=subject,
                                  version=1, time=at)

    def pay(self, key: str, amount: float, at: float, *, inputs: set[int] | None = None) -> Stamped:
        subject = self._name(inputs, 4, "p") if inputs is not None else f"{key}-p"
        self.paid.append(key)
        return self.payments.binary({"paymentId": key, "amount": amount}, type="payment.captured", subject=subject,
                                    version=1, time=at)

    def key(self, joins: set[int] | None = None) -> str:
        """A fresh join key (payment id), in one of `joins` (of the rule's 2 join partitions) when given."""
        return self._name(joins if joins is not None else {0, 1}, 2, "k")

    def flowing(self, pairs: int) -> list[Stamped]:
        """`pairs` paid orders timed now, on fresh keys (so over every input and join partition)."""
        at = time.time()
        out = []
        for _ in range(pairs):
            key = self.key()
            out += [self.order(key, 1, at), self.pay(key, 1, at)]
        return out


async def _flow(bootstrap: str, topic: str, orders: Orders, seconds: float, watch: WorkerProcess) -> float:
    """Paid orders, 4 every 0.5 s, for `seconds`; the most `watch`'s `paid` windows were held meanwhile (`_lag`)."""
    ends = time.monotonic() + seconds
    held = 0.0
    while time.monotonic() < ends:
        await produce(bootstrap, topic, orders.flowing(4))
        held = max(held, _lag(watch))
        await asyncio.sleep(0.5)
    return held


def _lag(worker: WorkerProcess) -> float:
    """How far the oldest watermark of the `paid` rule's join partitions on `worker` is behind the wall clock."""
    return _metrics(worker)[("byzguard_audit_watermark_lag_seconds", (("rule", "paid"),))]


def _kinds(found: list[Out]) -> list[tuple[str, str]]:
    return [((r.key or b"").decode(), (r.header("byzguard_audit_kind") or b"").decode()) for r in found]


def _split(owned: dict[str, TPs], names: RouteNames, repartition: str, away: str) -> tuple[set[int], set[int],
                                                                                           set[int]]:
    """(input partitions of the worker that goes away, input partitions of the one that stays, join partitions of
    the one that stays)."""
    stays = next(name for name in owned if name != away)
    gone_inputs = {p for t, p in owned[away] if t == names.input}
    stay_inputs = {p for t, p in owned[stays] if t == names.input}
    stay_joins = {p for t, p in owned[stays] if t == repartition}
    assert gone_inputs and stay_inputs and stay_joins, owned
    return gone_inputs, stay_inputs, stay_joins


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_a_stopped_worker_with_a_backlog_holds_the_other_workers_windows(worker_factory: WorkerFactory,
                                                                         guarantee: str) -> None:
    """Of two workers sharing the partitions (under either guarantee), one is stopped (SIGSTOP, shorter than its
    session timeout, so it keeps its partitions) for three times the 4 s window and 1 s grace while paid orders
    flow: an order joined by the running worker whose payment waits in the stopped worker's input partition, and
    every other paid order, is not reported `missing`, and nothing else is while it is stopped (its backlog holds
    the running worker's join windows); once it continues, the payments pair, and an order never paid is reported
    `missing` once."""
    bootstrap = worker_factory.bootstrap
    app_id = worker_factory.app_id
    names, discrepancies, one, two = _two_workers(worker_factory, SESSION_TIMEOUT, guarantee)
    repartition = f"{app_id}-audit-paid-repartition"
    joined = [names.input, names.verified, repartition]
    orders = Orders(uuid.uuid4().hex[:6])
    run_async(lambda: produce(bootstrap, names.input, orders.flowing(8)))
    run_async(lambda: wait_caught_up(bootstrap, app_id, joined, workers=[one, two]))
    owned = run_async(lambda: _owners(bootstrap, input_group(app_id), [one, two]))
    stopped_inputs, running_inputs, running_joins = _split(owned, names, repartition, "one")

    one.send(signal.SIGSTOP)  # between batches: it leaves no transaction open
    try:
        at = time.time()
        held, unpaid = orders.key(running_joins), orders.key(running_joins)
        first = [orders.order(held, 5, at, inputs=running_inputs), orders.pay(held, 5, at, inputs=stopped_inputs),
                 orders.order(unpaid, 3, at, inputs=running_inputs)]
        run_async(lambda: produce(bootstrap, names.input, first))
        lag = run_async(lambda: _flow(bootstrap, names.input, orders, AWAY, two))
        meanwhile = run_async(lambda: collect(bootstrap, discrepancies, idle=1.0, timeout=30))
        assert two.alive()
    finally:
        one.send(signal.SIGCONT)
    reported = _kinds(meanwhile)
    assert (held, "missing") not in reported, two.log_digest()
    assert [k for k in reported if k[0] in orders.paid] == [], (reported, two.log_digest())
    assert reported == [], (reported, two.log_digest())  # the unpaid order too waits for the stopped worker
    assert lag > AWAY - 2, f"the running worker's windows were held only {lag:.1f} s"
    found = run_async(lambda: collect(bootstrap, discrepancies, expected=1, idle=8.0, timeout=60))
    assert _kinds(found) == [(unpaid, "missing")], (_kinds(found), one.log_digest(), two.log_digest())
    run_async(lambda: wait_caught_up(bootstrap, app_id, joined, workers=[one, two]))
    assert run_async(lambda: _owners(bootstrap, input_group(app_id), [one, two])) == owned  # no rebalance
    print(f"\n{len(orders.paid)} paid orders, none reported; the running worker's windows held up to {lag:.1f} s")


def test_a_killed_worker_with_a_backlog_holds_the_survivors_windows_until_it_took_over(
        worker_factory: WorkerFactory) -> None:
    """Of two workers sharing the partitions, one is SIGKILLed while paid orders flow, an order joined by the
    survivor having its payment waiting in the dead worker's input partition: until the group's session (10 s)
    times out and the survivor takes the dead one's partitions over, restores them and drains their backlog, its
    join windows are held, so no paid order is reported `missing`; an order never paid is, once."""
    bootstrap = worker_factory.bootstrap
    app_id = worker_factory.app_id
    names, discrepancies, one, two = _two_workers(worker_factory, 10.0)
    repartition = f"{app_id}-audit-paid-repartition"
    joined = [names.input, names.verified, repartition]
    orders = Orders(uuid.uuid4().hex[:6])
    run_async(lambda: produce(bootstrap, names.input, orders.flowing(8)))
    run_async(lambda: wait_caught_up(bootstrap, app_id, joined, workers=[one, two]))
    owned = run_async(lambda: _owners(bootstrap, input_group(app_id), [one, two]))
    dead_inputs, live_inputs, live_joins = _split(owned, names, repartition, "one")

    one.kill()
    at = time.time()
    held, unpaid = orders.key(live_joins), orders.key(live_joins)
    first = [orders.order(held, 5, at, inputs=live_inputs), orders.pay(held, 5, at, inputs=dead_inputs),
             orders.order(unpaid, 3, at, inputs=live_inputs)]
    run_async(lambda: produce(bootstrap, names.input, first))
    lag = run_async(lambda: _flow(bootstrap, names.input, orders, AWAY, two))
    assert lag > WINDOW + 1, f"the survivor's windows were held only {lag:.1f} s"
    run_async(lambda: wait_caught_up(bootstrap, app_id, joined, workers=[two], timeout=90))
    found = run_async(lambda: collect(bootstrap, discrepancies, expected=1, idle=8.0, timeout=60))
    assert _kinds(found) == [(unpaid, "missing")], (_kinds(found), two.log_digest())
    owned = run_async(lambda: _owners(bootstrap, input_group(app_id), [two]))
    assert {p for t, p in owned["two"] if t == names.input} == {0, 1, 2, 3}
    print(f"\n{len(orders.paid)} paid orders, none reported; the survivor's windows held up to {lag:.1f} s")
