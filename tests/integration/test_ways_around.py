"""Small ways around the guard, on a running worker and the real broker: an event type the route does not list,
JSON that repeats a key, and bytes declared JSON that are not. Each is quarantined with its own code, byte for
byte, and the clean events beside them are verified."""

from __future__ import annotations

import time

import pytest

from byzguard.stamp import Stamped, Stamper
from tests.integration.worker_harness import TEST_ID, Events, WorkerFactory, by_id, collect, produce, wait_caught_up

pytestmark = pytest.mark.kafka


async def test_unlisted_types_and_ambiguous_or_false_json_are_quarantined_with_their_codes(
    worker_factory: WorkerFactory,
) -> None:
    """On the harness's route (order.confirmed, payment.captured): an unlisted `order.confirmedd` from an unknown
    source with a valid sha256 is type.unlisted; a repeated key in binary data or structured data is
    decode.ambiguous; binary bytes declared application/json that do not parse are decode.malformed (the type
    has no rules); every record is in exactly one output topic, clean ones verified."""
    route = worker_factory.configure(partitions=2)
    worker = worker_factory.start("w1")
    events = Events()
    clean = [events.clean(f"order-{i}", 1) for i in range(4)]
    stranger = Stamper("stranger")
    orders = Stamper("orders")
    now = time.time()
    structured = orders.structured({"amount": 5}, type="order.confirmed", subject="order-s", version=1, time=now,
                                   event_id="ambiguous-structured")
    assert b'"amount":5' in structured.value
    bad = {
        "type.unlisted": stranger.binary({"amount": 1}, type="order.confirmedd", subject="order-u", version=1,
                                         time=now, event_id="unlisted-type"),
        "decode.ambiguous": orders.binary(b'{"amount": -1, "amount": 5}', type="order.confirmed", subject="order-a",
                                          version=1, time=now, event_id="ambiguous-binary"),
        "decode.malformed": orders.binary(b"amount=5", type="order.confirmed", subject="order-m", version=1,
                                          time=now, event_id="declared-json"),
    }
    ambiguous_structured = Stamped(structured.key, structured.value.replace(b'"amount":5', b'"amount":-1,"amount":5'),
                                   [*structured.headers, (TEST_ID, b"ambiguous-structured")], structured.event_id)
    await produce(worker_factory.bootstrap, route.input, [*clean, *bad.values(), ambiguous_structured])
    await wait_caught_up(worker_factory.bootstrap, worker_factory.app_id, [route.input], workers=[worker])

    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=len(clean)))
    quarantined = by_id(await collect(worker_factory.bootstrap, route.quarantine, expected=len(bad) + 1))
    assert sorted(verified) == sorted(s.event_id for s in clean)
    assert sorted(quarantined) == sorted([*(s.event_id for s in bad.values()), ambiguous_structured.event_id])
    assert all(len(records) == 1 for records in (*verified.values(), *quarantined.values()))
    for code, sent in [*bad.items(), ("decode.ambiguous", ambiguous_structured)]:
        out = quarantined[sent.event_id][0]
        assert out.codes == {code}, out.reasons
        assert out.value == sent.value
