"""Read-after-write receipts against the real broker: a confirmed send returns byzguard's verdict on it."""

from __future__ import annotations

import time

import pytest

from byzguard.client.producer import GuardedProducer, ReceiptsTopicMissing, ReceiptTimeout
from byzguard.clocks import VectorClock
from tests.conftest import run_async
from tests.integration.worker_harness import RouteNames, WorkerFactory, collect

pytestmark = pytest.mark.kafka

CONFIG = """\
routes:
  - name: perms
    inputs: [{input}]
    verified_topic: {verified}
    quarantine_topic: {quarantine}
    receipts_topic: {receipts}
    partitions: 2
    types:
      role.changed:
        sources: [permissions]
        rules: [{{name: known_role, expr: "data.role in ['admin', 'member']"}}]
"""


def start_with(factory: WorkerFactory, template: str, *, partitions: int) -> tuple[RouteNames, str]:
    """Write `template` with fresh topic names and a receipts topic, start a worker on it; (route, receipts)."""
    route = factory.configure(partitions=partitions)
    receipts = f"{route.input}-receipts"
    assert factory.config_path is not None
    factory.config_path.write_text(template.format(input=route.input, verified=route.verified,
                                                   quarantine=route.quarantine, receipts=receipts))
    factory.start("w1")
    return route, receipts


def test_confirmed_send_returns_the_verdict_once_it_is_visible(worker_factory: WorkerFactory) -> None:
    """A clean write is confirmed verified only when consumers can read it; a bad one comes back quarantined."""
    route, receipts = start_with(worker_factory, CONFIG, partitions=2)

    async def scenario() -> tuple[object, object]:
        async with GuardedProducer(worker_factory.bootstrap, source="permissions") as producer:
            good = await producer.send_confirmed(route.input, {"role": "admin"}, type="role.changed",
                                                 subject="user-1", version=1, receipts_topic=receipts, timeout=30)
            # Read-after-write: at the moment of the receipt the verified record is already readable.
            visible = await collect(worker_factory.bootstrap, route.verified, expected=1, idle=0.0, timeout=5)
            bad = await producer.send_confirmed(route.input, {"role": "root"}, type="role.changed",
                                                subject="user-1", version=2, receipts_topic=receipts, timeout=30)
            return (good, visible), bad

    (good, visible), bad = run_async(scenario)
    assert good.outcome == "verified" and good.visible and good.reasons == []  # type: ignore[attr-defined]
    assert [o.event_id for o in visible] == [good.event_id]  # type: ignore[attr-defined]
    assert bad.outcome == "quarantined" and not bad.visible  # type: ignore[attr-defined]
    assert [r["code"] for r in bad.reasons] == ["invariant.violated"]  # type: ignore[attr-defined]


def test_confirmed_send_times_out_without_a_guard(worker_factory: WorkerFactory) -> None:
    """With no worker running, a confirmed send raises ReceiptTimeout instead of claiming success."""
    route = worker_factory.configure(partitions=1)

    async def scenario() -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        admin = AIOKafkaAdminClient(bootstrap_servers=worker_factory.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(f"{route.input}-receipts", 1, 1), NewTopic(route.input, 1, 1)])
        await admin.close()
        async with GuardedProducer(worker_factory.bootstrap, source="permissions") as producer:
            await producer.send_confirmed(route.input, {"role": "admin"}, type="role.changed", subject="u",
                                          receipts_topic=f"{route.input}-receipts", timeout=2)

    with pytest.raises(ReceiptTimeout):
        run_async(scenario)


CAUSAL_CONFIG = """\
routes:
  - name: docs
    inputs: [{input}]
    verified_topic: {verified}
    quarantine_topic: {quarantine}
    receipts_topic: {receipts}
    partitions: 1
    default_type: doc.edited
    causal: {{buffer: true, deadline: 2s}}
    types:
      doc.edited: {{}}
"""


def test_a_held_event_quarantined_at_its_deadline_gets_its_final_receipt(worker_factory: WorkerFactory) -> None:
    """An event held for a dependency that never comes is confirmed quarantined (causal.gap) at its deadline,
    not left to time out on its `held` receipt."""
    route, receipts = start_with(worker_factory, CAUSAL_CONFIG, partitions=1)

    async def scenario() -> object:
        async with GuardedProducer(worker_factory.bootstrap, source="b") as producer:
            return await producer.send_confirmed(route.input, {"n": 1}, type="doc.edited", subject="doc-1",
                                                 vclock=VectorClock({"a": 1, "b": 1}), receipts_topic=receipts,
                                                 timeout=40)

    receipt = run_async(scenario)
    assert receipt.outcome == "quarantined"  # type: ignore[attr-defined]
    assert [r["code"] for r in receipt.reasons] == ["causal.gap"]  # type: ignore[attr-defined]
    assert receipt.latency_s < 20  # type: ignore[attr-defined]


def test_confirmed_send_without_a_receipts_topic_fails_at_once(kafka_bootstrap: str) -> None:
    """A confirmed send to a receipts topic that does not exist fails before sending, saying what to configure."""

    async def scenario() -> None:
        async with GuardedProducer(kafka_bootstrap, source="permissions") as producer:
            await producer.send_confirmed("perms-no-such-route", {"role": "admin"}, type="role.changed",
                                          subject="u", receipts_topic="no-such-receipts-topic", timeout=30)

    started = time.monotonic()
    with pytest.raises(ReceiptsTopicMissing, match="receipts_topic: no-such-receipts-topic"):
        run_async(scenario)
    assert time.monotonic() - started < 10
