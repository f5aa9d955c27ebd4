"""The audits' watermark across workers of one app on a real broker: a worker stopped (SIGSTOP) or killed
(SIGKILL) with a backlog holds the join windows of the other worker its records feed, and partitions handed over
between workers under load hold the windows their records feed while they move, so no paid order is reported
`missing` meanwhile, and an order never paid still is, once (docs/audits.md, Time)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
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

WINDOW = 2.0  # grace 1 s (test_audit.CONFIG)
#: Far longer than the SIGSTOP: the stopped worker keeps its partitions (no rebalance while it is stopped).
SESSION_TIMEOUT = 60.0
#: How long a worker is away: three times the window and grace.
AWAY = 9.0
#: How long after the last record a discrepancy it could cause has surely come: the window, grace, a few side
#: reads (every WINDOW/4, at least 0.5 s) and a punctuation.
QUIET = WINDOW + 1.0 + 2.0

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


def _start(factory: WorkerFactory, *names: str, session_timeout: float = 10.0) -> list[WorkerProcess]:
    """Workers of the factory's app whose group sessions time out after `session_timeout`, started together and
    all ready."""
    workers = [factory.new_worker(name) for name in names]
    for worker in workers:
        worker.env["BYZGUARD_SESSION_TIMEOUT"] = str(session_timeout)
        worker.start()
    for worker in workers:
        worker.wait_ready(90)
    return workers


@dataclass
class Shared:
    """Two ready workers of one app (exactly_once, both audit rules, `WINDOW` windows) sharing the partitions, the
    paid orders that warmed them up routed and joined."""

    names: RouteNames
    discrepancies: str
    repartition: str
    one: WorkerProcess
    two: WorkerProcess
    orders: Orders
    #: Per worker name, the topic partitions it owns in the input group.
    owned: dict[str, TPs]

    @property
    def joined(self) -> list[str]:
        """The topics every record passes before it is joined."""
        return [self.names.input, self.names.verified, self.repartition]

    def split(self, away: str) -> tuple[set[int], set[int], set[int]]:
        """(input partitions of the worker `away`, input partitions of the other one, join partitions of the other
        one)."""
        stays = next(name for name in self.owned if name != away)
        gone_inputs = {p for t, p in self.owned[away] if t == self.names.input}
        stay_inputs = {p for t, p in self.owned[stays] if t == self.names.input}
        stay_joins = {p for t, p in self.owned[stays] if t == self.repartition}
        assert gone_inputs and stay_inputs and stay_joins, self.owned
        return gone_inputs, stay_inputs, stay_joins

    def held_and_unpaid(self, away: str) -> tuple[str, str, list[Stamped]]:
        """Two join keys of the partitions of the worker that stays, and their records: an order `held` read by the
        worker that stays whose payment waits in an input partition of the worker `away`, and an order `unpaid`."""
        gone_inputs, stay_inputs, stay_joins = self.split(away)
        at = time.time()
        held, unpaid = self.orders.key(stay_joins), self.orders.key(stay_joins)
        return held, unpaid, [self.orders.order(held, 5, at, inputs=stay_inputs),
                              self.orders.pay(held, 5, at, inputs=gone_inputs),
                              self.orders.order(unpaid, 3, at, inputs=stay_inputs)]


def _shared(factory: WorkerFactory, session_timeout: float) -> Shared:
    """Two workers started on the factory's app (see `Shared`), their group sessions timing out after
    `session_timeout`."""
    bootstrap, app_id = factory.bootstrap, factory.app_id
    names, discrepancies = _audited(factory, WINDOW, "exactly_once")
    one, two = _start(factory, "one", "two", session_timeout=session_timeout)
    orders = Orders(uuid.uuid4().hex[:6])
    shared = Shared(names, discrepancies, f"{app_id}-audit-paid-repartition", one, two, orders, {})
    run_async(lambda: produce(bootstrap, names.input, orders.flowing(8)))
    run_async(lambda: wait_caught_up(bootstrap, app_id, shared.joined, workers=[one, two]))
    shared.owned = run_async(lambda: _owners(bootstrap, input_group(app_id), [one, two]))
    return shared


class Flow:
    """Paid orders, 4 every 0.5 s, until `stop`, and the most the watermarks of the live workers of `watch` lagged
    meanwhile (`held`). Other records go through `send`: one producer at a time, each stamping right before it
    sends, so the sources' Lamport clocks never go back in the input topic."""

    def __init__(self, bootstrap: str, topic: str, orders: Orders, watch: list[WorkerProcess]) -> None:
        self.bootstrap, self.topic, self.orders, self.watch = bootstrap, topic, orders, watch
        self.lock = asyncio.Lock()
        self.held = 0.0
        self._stop = asyncio.Event()

    async def send(self, stamp: Callable[[], list[Stamped]]) -> None:
        """Stamp records (`stamp`) and send them, between two lots of the flow."""
        async with self.lock:
            await produce(self.bootstrap, self.topic, stamp())

    async def run(self, seconds: float | None = None) -> float:
        """Flow until `stop` (or for `seconds`); how long the windows were held at the most."""
        if seconds is not None:
            asyncio.get_running_loop().call_later(seconds, self._stop.set)
        while not self._stop.is_set():
            await self.send(lambda: self.orders.flowing(4))
            for worker in self.watch:
                if worker.alive():
                    with contextlib.suppress(OSError, KeyError):  # not serving yet, or no join partition yet
                        self.held = max(self.held, await asyncio.to_thread(_lag, worker))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)
        return self.held

    def stop(self) -> None:
        self._stop.set()


async def _flow(bootstrap: str, topic: str, orders: Orders, seconds: float, watch: WorkerProcess) -> float:
    """Paid orders, 4 every 0.5 s, for `seconds`; the most `watch`'s `paid` windows were held meanwhile (`_lag`)."""
    return await Flow(bootstrap, topic, orders, [watch]).run(seconds)


def _lag(worker: WorkerProcess) -> float:
    """How far the oldest watermark of the `paid` rule's join partitions on `worker` is behind the wall clock."""
    return _metrics(worker)[("byzguard_audit_watermark_lag_seconds", (("rule", "paid"),))]


def _kinds(found: list[Out]) -> list[tuple[str, str]]:
    return [((r.key or b"").decode(), (r.header("byzguard_audit_kind") or b"").decode()) for r in found]


def test_a_stopped_worker_with_a_backlog_holds_the_other_workers_windows(worker_factory: WorkerFactory) -> None:
    """Of two workers sharing the partitions, one is stopped (SIGSTOP, shorter than its session timeout, so it
    keeps its partitions) for three times the 2 s window and 1 s grace while paid orders flow: an order joined by
    the running worker whose payment waits in the stopped worker's input partition, and every other paid order, is
    not reported `missing`, and nothing else is while it is stopped (its backlog holds the running worker's join
    windows); once it continues, the payments pair, and an order never paid is reported `missing` once.
    (exactly_once; the watermark reads the group's committed offsets under either guarantee: at_least_once's
    commits hold the windows in the hand-over test below and in test_audit.py's backlog test.)"""
    bootstrap, app_id = worker_factory.bootstrap, worker_factory.app_id
    shared = _shared(worker_factory, SESSION_TIMEOUT)
    one, two = shared.one, shared.two
    held, unpaid, first = shared.held_and_unpaid("one")

    one.send(signal.SIGSTOP)  # between batches: it leaves no transaction open
    try:
        run_async(lambda: produce(bootstrap, shared.names.input, first))
        lag = run_async(lambda: _flow(bootstrap, shared.names.input, shared.orders, AWAY, two))
        meanwhile = run_async(lambda: collect(bootstrap, shared.discrepancies, idle=1.0, timeout=30))
        assert two.alive()
    finally:
        one.send(signal.SIGCONT)
    reported = _kinds(meanwhile)
    assert (held, "missing") not in reported, two.log_digest()
    assert [k for k in reported if k[0] in shared.orders.paid] == [], (reported, two.log_digest())
    assert reported == [], (reported, two.log_digest())  # the unpaid order too waits for the stopped worker
    assert lag > AWAY - 2, f"the running worker's windows were held only {lag:.1f} s"
    found = run_async(lambda: collect(bootstrap, shared.discrepancies, expected=1, idle=QUIET, timeout=60))
    assert _kinds(found) == [(unpaid, "missing")], (_kinds(found), one.log_digest(), two.log_digest())
    run_async(lambda: wait_caught_up(bootstrap, app_id, shared.joined, workers=[one, two]))
    assert run_async(lambda: _owners(bootstrap, input_group(app_id), [one, two])) == shared.owned  # no rebalance
    print(f"\n{len(shared.orders.paid)} paid orders, none reported; the running worker's windows held up to "
          f"{lag:.1f} s")


def test_a_killed_worker_with_a_backlog_holds_the_survivors_windows_until_it_took_over(
        worker_factory: WorkerFactory) -> None:
    """Of two workers sharing the partitions, one is SIGKILLed while paid orders flow, an order joined by the
    survivor having its payment waiting in the dead worker's input partition: until the group's session (10 s)
    times out and the survivor takes the dead one's partitions over, restores them and drains their backlog, its
    join windows are held, so no paid order is reported `missing`; an order never paid is, once."""
    bootstrap, app_id = worker_factory.bootstrap, worker_factory.app_id
    shared = _shared(worker_factory, 10.0)
    two = shared.two
    _, unpaid, first = shared.held_and_unpaid("one")

    shared.one.kill()
    run_async(lambda: produce(bootstrap, shared.names.input, first))
    lag = run_async(lambda: _flow(bootstrap, shared.names.input, shared.orders, AWAY, two))
    assert lag > WINDOW + 1, f"the survivor's windows were held only {lag:.1f} s"
    run_async(lambda: wait_caught_up(bootstrap, app_id, shared.joined, workers=[two], timeout=90))
    found = run_async(lambda: collect(bootstrap, shared.discrepancies, expected=1, idle=QUIET, timeout=60))
    assert _kinds(found) == [(unpaid, "missing")], (_kinds(found), two.log_digest())
    owned = run_async(lambda: _owners(bootstrap, input_group(app_id), [two]))
    assert {p for t, p in owned["two"] if t == shared.names.input} == {0, 1, 2, 3}
    print(f"\n{len(shared.orders.paid)} paid orders, none reported; the survivor's windows held up to {lag:.1f} s")


async def test_partitions_handed_over_under_load_hold_the_windows_their_records_feed(
        worker_factory: WorkerFactory) -> None:
    """Under at_least_once, with 1 s windows and 1 s grace, paid orders flow while a second worker joins: part of
    the input and join partitions move to it (the first worker finishes and commits what it read of them, the second
    one restores them and reads on from the committed offsets). The second one is then stopped (SIGSTOP) for three
    times the window and grace, the payment of an order joined on the first one waiting in an input partition that
    moved: that partition holds the first worker's windows. Then the first worker leaves (SIGTERM: every partition
    moves to the second one). No paid order is reported `missing`, however its order and payment are split over the
    moves; an order never paid before each move, and one after them, are reported `missing` once each."""
    bootstrap, app_id = worker_factory.bootstrap, worker_factory.app_id
    names, discrepancies = _audited(worker_factory, 1.0)
    repartition = f"{app_id}-audit-paid-repartition"
    orders = Orders(uuid.uuid4().hex[:6])
    [one] = await asyncio.to_thread(_start, worker_factory, "one", session_timeout=30.0)
    await produce(bootstrap, names.input, orders.flowing(8))
    flow = Flow(bootstrap, names.input, orders, [one])
    unpaid: list[str] = []

    def unpaid_order() -> list[Stamped]:
        unpaid.append(orders.key())
        return [orders.order(unpaid[-1], 3, time.time())]

    flowing = asyncio.ensure_future(flow.run())
    try:
        await flow.send(unpaid_order)
        [two] = await asyncio.to_thread(_start, worker_factory, "two", session_timeout=30.0)
        flow.watch.append(two)
        shared = Shared(names, discrepancies, repartition, one, two, orders,
                        await _owners(bootstrap, input_group(app_id), [one, two]))
        flow.held = 0.0
        two.send(signal.SIGSTOP)
        try:
            async with flow.lock:
                held, never, first = shared.held_and_unpaid("two")
                unpaid.append(never)
                await produce(bootstrap, names.input, first)
            await asyncio.sleep(3 * (1.0 + 1.0))  # the stop: three times the window and grace
            assert flow.held > 1.0 + 1.0, f"the first worker's windows were held only {flow.held:.1f} s"
        finally:
            two.send(signal.SIGCONT)
        await flow.send(unpaid_order)
        assert await asyncio.to_thread(one.stop) == 0
        alone = await _owners(bootstrap, input_group(app_id), [two])
        await _routing(two, more_than=await asyncio.to_thread(two.events_processed))
        await flow.send(unpaid_order)
    finally:
        flow.stop()
        await flowing
    await wait_caught_up(bootstrap, app_id, shared.joined, workers=[two])
    found = await collect(bootstrap, discrepancies, expected=len(unpaid), idle=QUIET, timeout=60)
    assert (held, "missing") not in _kinds(found), two.log_digest()
    assert sorted(_kinds(found)) == sorted((key, "missing") for key in unpaid), (_kinds(found), two.log_digest())
    assert {p for t, p in alone["two"] if t in (names.input, repartition)} == {0, 1, 2, 3}, alone
    print(f"\n{len(orders.paid)} paid orders over two hand-overs, none reported; windows held up to "
          f"{flow.held:.1f} s")


async def _routing(worker: WorkerProcess, more_than: float = 0.0, timeout: float = 60.0) -> None:
    """Wait until `worker` has routed more than `more_than` input records."""
    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(worker.events_processed) <= more_than:
        if not worker.alive():
            raise worker.fail("exited")
        assert time.monotonic() < deadline, worker.fail(f"routed no more than {more_than:.0f} records")
        await asyncio.sleep(0.2)
