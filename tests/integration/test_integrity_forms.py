"""Integrity forms through a real worker on the real broker: the bound form catches replays under another
subject or version; the value-only form passes (with its warning) only for a source declared to use it;
the article's headerless `{data, checksum}` producer is guarded on a topic that declares its source."""

from __future__ import annotations

import time

import pytest

from byzguard.integrity import HMAC_SHA256, VALUE_ONLY
from byzguard.stamp import Stamped, Stamper, seed_checksum_event
from tests.integration.worker_harness import (
    PAYMENTS_KEY,
    Out,
    WorkerFactory,
    collect,
    produce,
    wait_caught_up,
)

pytestmark = pytest.mark.kafka

CONFIG = """\
keys:
  orders-1: {{source: orders, secret_env: BYZGUARD_KEY_ORDERS_1}}
  payments-1: {{source: payments, secret_env: BYZGUARD_KEY_PAYMENTS_1}}
sources:
  payments: {{forms: [value-only]}}
  web-shop: {{forms: [value-only]}}
routes:
  - name: orders
    inputs: [{input}, {{topic: {web}, source: web-shop}}]
    verified_topic: {verified}
    quarantine_topic: {quarantine}
    partitions: {partitions}
    require_checksum: true
    default_type: order.confirmed
    types:
      order.confirmed:
        sources: [orders, web-shop]
      payment.captured:
        sources: [payments]
        key_ids: [payments-1]
"""


def _replayed(s: Stamped, key: bytes, **headers: bytes) -> Stamped:
    """The captured record `s` re-sent under another record key and with some headers changed."""
    return Stamped(key, s.value, [(k, headers.get(k, v)) for k, v in s.headers], s.event_id)


def _one(outputs: list[Out], key: bytes) -> Out:
    found = [o for o in outputs if o.key == key]
    assert len(found) == 1, f"{key!r}: {len(found)} records in {outputs[0].topic if outputs else '?'}"
    return found[0]


async def test_replays_are_caught_and_legacy_forms_pass_only_where_declared(worker_factory: WorkerFactory) -> None:
    """A captured signed payment replayed under another subject and as a newer version is quarantined
    integrity.bad_mac; a value-only payment (payments is declared to use that form) is verified with the
    integrity.legacy_form warning while a value-only order (orders is not) is quarantined integrity.unbound;
    a headerless {data, checksum} on the topic declared as web-shop's is verified with the same warning."""
    route = worker_factory.configure(partitions=2)
    web = f"{worker_factory.app_id}-web"
    assert worker_factory.config_path is not None
    worker_factory.config_path.write_text(CONFIG.format(input=route.input, web=web, verified=route.verified,
                                                        quarantine=route.quarantine, partitions=2))
    worker = worker_factory.start("w1")
    now = time.time()
    payments = Stamper("payments", algorithm=HMAC_SHA256, key=PAYMENTS_KEY)
    signed = payments.binary({"payment": "pay-a", "amount": 12.5}, type="payment.captured", subject="pay-a",
                             version=1, time=now, event_id="signed-pay-a")
    other_subject = _replayed(signed, b"pay-b", ce_subject=b"pay-b")
    newer_version = _replayed(signed, b"pay-a", ce_entityversion=b"2")
    legacy_ok = Stamper("payments", algorithm=HMAC_SHA256, key=PAYMENTS_KEY, form=VALUE_ONLY).binary(
        {"payment": "pay-c", "amount": 3.5}, type="payment.captured", subject="pay-c", version=1, time=now,
        event_id="legacy-pay-c")
    legacy_refused = Stamper("orders", form=VALUE_ONLY).binary(
        {"order": "order-l", "amount": 9.5}, type="order.confirmed", subject="order-l", version=1, time=now,
        event_id="legacy-order-l")
    article = Stamped(b"order-w", seed_checksum_event({"order": "order-w", "amount": 20.5}), [], "article")

    await produce(worker_factory.bootstrap, route.input, [signed])
    await wait_caught_up(worker_factory.bootstrap, worker_factory.app_id, [route.input], workers=[worker])
    await produce(worker_factory.bootstrap, route.input,
                  [other_subject, newer_version, legacy_ok, legacy_refused])
    await produce(worker_factory.bootstrap, web, [article])
    await wait_caught_up(worker_factory.bootstrap, worker_factory.app_id, [route.input, web], workers=[worker])

    verified = await collect(worker_factory.bootstrap, route.verified, expected=3)
    quarantined = await collect(worker_factory.bootstrap, route.quarantine, expected=3)
    assert len(verified) == 3 and len(quarantined) == 3

    original = _one(verified, b"pay-a")
    assert original.header("byzguard_verdict") == b"pass" and original.value == signed.value
    replays = [o for o in quarantined if o.event_id == "signed-pay-a"]
    assert sorted(o.key for o in replays if o.key is not None) == [b"pay-a", b"pay-b"]
    assert all(o.codes == {"integrity.bad_mac"} for o in replays)
    assert {o.header("ce_entityversion") for o in replays} == {b"1", b"2"}

    legacy = _one(verified, b"pay-c")
    assert legacy.header("byzguard_verdict") == b"warn" and legacy.codes == {"integrity.legacy_form"}
    refused = _one(quarantined, b"order-l")
    assert refused.codes == {"integrity.unbound"} and refused.value == legacy_refused.value

    headerless = _one(verified, b"order-w")
    assert headerless.value == article.value and headerless.codes == {"integrity.legacy_form"}
    assert headerless.header("byzguard_verdict") == b"warn"
