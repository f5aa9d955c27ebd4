"""A producer byzguard did not write: the CloudEvents Python SDK (`cloudevents`, Kafka binding, binary mode)
with the integrity extension attributes computed from ENVELOPE.md alone, without byzguard's own code."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.bindings import kafka as ce_kafka  # the test extra's: missing, the module fails
from cloudevents.core.formats import json as ce_json
from cloudevents.core.v1 import event as ce_event

from byzguard.guard import RecordIn
from byzguard.integrity import Key, KeyRing
from byzguard.verdict import Outcome
from byzguard.verify_again import verify_again

from .conftest import Harness

NOW = 1_800_000_000.0
SECRET = b"pricing-secret"  # conftest's pricing-1 key

# ENVELOPE.md, "The bound form, byte for byte": (line, binary-mode header), in order.
LINES = [("id", "ce_id"), ("source", "ce_source"), ("type", "ce_type"), ("subject", "ce_subject"),
         ("time", "ce_time"), ("entityversion", "ce_entityversion"), ("lamporttime", "ce_lamporttime"),
         ("lamportinstance", "ce_lamportinstance"), ("vectorclock", "ce_vectorclock"),
         ("datacontenttype", "content-type"), ("checksumalg", "ce_checksumalg"), ("keyid", "ce_keyid")]


def signature_base(headers: dict[str, bytes], value: bytes) -> bytes:
    """The base, read off the spec: `checksumform: bound`, then `name: value` per present component, then
    `data: ` and the value bytes as sent."""
    text = "checksumform: bound\n" + "".join(f"{line}: {headers[header].decode()}\n"
                                             for line, header in LINES if header in headers)
    return text.encode() + b"data: " + value


def sdk_message(data: Any, *, subject: str, version: int, lamport: int) -> Any:
    """A Kafka message made by the SDK, with the bound-form MAC as its `checksum` extension attribute."""
    attributes = {
        "id": f"sdk-{subject}-{version}", "source": "pricing", "type": "price.updated", "specversion": "1.0",
        "subject": subject, "time": datetime.fromtimestamp(NOW - 30, UTC), "datacontenttype": "application/json",
        "entityversion": version, "lamporttime": lamport,
        "checksumform": "bound", "checksumalg": "hmac-sha256", "keyid": "pricing-1", "partitionkey": subject,
    }
    fmt = ce_json.JSONFormat()
    unsigned = ce_kafka.to_binary(ce_event.CloudEvent(attributes=attributes, data=data), fmt)
    mac = hmac.new(SECRET, signature_base(unsigned.headers, unsigned.value), hashlib.sha256).hexdigest()
    message = ce_kafka.to_binary(ce_event.CloudEvent(attributes={**attributes, "checksum": mac}, data=data), fmt)
    assert message.value == unsigned.value  # the SDK writes the same bytes again
    return message


def _record(message: Any, offset: int, **changed: bytes) -> RecordIn:
    key = message.key.encode() if isinstance(message.key, str) else message.key
    headers = [(k, changed.get(k, v)) for k, v in message.headers.items()]
    return RecordIn(changed.get("key", key), message.value, headers, "in", 0, offset, NOW)


def _run(h: Harness, record: RecordIn) -> Any:
    return h.apply(h.guard.process(record, h.route, h.state, now=NOW)).first


def test_sdk_binary_message_signed_per_the_spec_is_verified() -> None:
    """The SDK's binary-mode message, MAC'd over the spec's base, verifies with no reason, in the guard and
    again downstream."""
    h = Harness()
    message = sdk_message({"price": 49.99, "currency": "USD"}, subject="sku-1", version=1, lamport=5)
    assert message.headers["ce_time"] == b"2027-01-15T07:59:30Z"  # the SDK's own time text is what is bound
    routed = _run(h, _record(message, 1))
    assert routed.decision.outcome is Outcome.VERIFIED and routed.decision.reasons == ()
    ring = KeyRing({"pricing-1": Key("pricing-1", "pricing", SECRET)})
    assert verify_again(message.key.encode(), message.value, list(message.headers.items()), ring).ok


def test_sdk_message_replayed_under_another_subject_or_version_fails() -> None:
    """The same SDK message re-sent as another entity or a newer version is integrity.bad_mac."""
    h = Harness()
    message = sdk_message({"price": 49.99, "currency": "USD"}, subject="sku-1", version=1, lamport=5)
    assert _run(h, _record(message, 1)).decision.outcome is Outcome.VERIFIED
    other = _run(h, _record(message, 2, key=b"sku-2", ce_subject=b"sku-2", ce_partitionkey=b"sku-2"))
    newer = _run(h, _record(message, 3, ce_entityversion=b"2", ce_lamporttime=b"6"))
    for routed in (other, newer):
        assert [r.code.value for r in routed.decision.reasons] == ["integrity.bad_mac"]
    honest = sdk_message({"price": 50.99, "currency": "USD"}, subject="sku-1", version=2, lamport=6)
    assert _run(h, _record(honest, 4)).decision.outcome is Outcome.VERIFIED
