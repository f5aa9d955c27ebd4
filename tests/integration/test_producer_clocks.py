"""Producers in production against the real broker: replicas and restarts of one source are never refused for
their Lamport clocks, while a stale replay of an old event still is."""

from __future__ import annotations

import time

import pytest

from byzguard.client.producer import GuardedProducer
from byzguard.stamp import Stamped
from tests.conftest import run_async
from tests.integration.worker_harness import WorkerFactory, collect

pytestmark = pytest.mark.kafka


def order(producer: GuardedProducer, subject: str) -> Stamped:
    """A clean order.confirmed for a new entity, stamped by `producer`."""
    return producer.stamp({"order": subject, "amount": 10.5}, type="order.confirmed", subject=subject, version=1,
                          time=time.time())


def test_replicas_and_restarts_of_one_source_pass_and_a_stale_replay_is_caught(
        worker_factory: WorkerFactory) -> None:
    """Two replicas of `orders` (one wall clock 2 s behind), interleaved, then a producer restarted twice under
    a stable instance name and once with a new id: every event verified; an old event re-sent last is
    lamport.regression."""
    route = worker_factory.configure(partitions=2)
    worker = worker_factory.start("w1")
    bootstrap = worker_factory.bootstrap

    async def scenario() -> tuple[list[str], str]:
        sent: list[str] = []
        async with GuardedProducer(bootstrap, source="orders") as a, \
                GuardedProducer(bootstrap, source="orders") as b:
            b.stamper.clock = lambda: time.time() - 2.0  # a replica whose wall clock is behind the other's
            stale = order(a, "replayed-0")  # stamped now, sent at the end: an old event replayed
            for n in range(40):
                for name, replica in (("a", a), ("b", b)):
                    record = order(replica, f"{name}-{n}")
                    await replica.send_stamped(route.input, record)
                    sent.append(record.event_id)
            await a.flush()
            await b.flush()
        for run in range(3):  # restarts: two under one stable name, then one with a new random instance
            kwargs = {"instance": "orders-0"} if run < 2 else {}
            async with GuardedProducer(bootstrap, source="orders", **kwargs) as restarted:  # type: ignore[arg-type]
                for n in range(10):
                    record = order(restarted, f"restart{run}-{n}")
                    await restarted.send_stamped(route.input, record)
                    sent.append(record.event_id)
                await restarted.flush()
        async with GuardedProducer(bootstrap, source="orders") as replayer:
            await replayer.send_stamped(route.input, stale)
            await replayer.flush()
        return sent, stale.event_id

    sent, stale_id = run_async(scenario, timeout=120)
    verified = run_async(lambda: collect(bootstrap, route.verified, expected=len(sent), timeout=90), timeout=120)
    quarantined = run_async(lambda: collect(bootstrap, route.quarantine, expected=1, timeout=60), timeout=90)
    assert sorted(o.event_id for o in verified) == sorted(sent), worker.log_tail()  # 0 false positives
    assert [(o.event_id, o.codes) for o in quarantined] == [(stale_id, {"lamport.regression"})]
