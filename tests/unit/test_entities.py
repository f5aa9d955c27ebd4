"""Last-known-good answers without a broker: freshness against max_age, asymmetric retention, owner partition."""

from __future__ import annotations

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from app.entities import EXPIRED, FALLBACK, FRESH, NOT_FOUND, describe_last_good, entity_partition
from byzguard import config as guard_config
from byzguard.client.lkg import LastKnownGoodUnavailable, parse_response
from byzguard.clocks import VectorClock
from byzguard.state import EntityState

T0 = 1_800_000_000.0
CONFIG = """
defaults: {max_age: 1h}
last_good_retention: 10d
routes:
  - name: prices
    inputs: [prices]
    verified_topic: prices.verified
    quarantine_topic: prices.quarantine
    types:
      price.updated: {max_age: 60s}
      note.added: {}
"""
ROUTE = guard_config.loads(CONFIG).routes[0]
RETENTION = 10 * 86400.0


def state(data: bytes = b'{"price": 49.99}', *, event_time: float | None = T0, type: str = "price.updated"
          ) -> EntityState:
    return EntityState(version=7, vclock=VectorClock({"pricing": 3}), content_hash=b"\x01", last_good=data,
                       last_good_type=type, verified_at=T0 + 1, event_time=event_time)


def test_value_within_max_age_is_fresh() -> None:
    """A value younger than its type's max_age is served as fresh, with version, clock and times."""
    outcome, body = describe_last_good(state(), route=ROUTE, entity="sku-1", retention=RETENTION, now=T0 + 30)
    assert outcome == FRESH and body["fresh"] is True
    assert body["value"] == {"price": 49.99} and body["version"] == 7 and body["vclock"] == {"pricing": 3}
    assert body["age_seconds"] == 30 and body["max_age_seconds"] == 60
    assert body["verified_at"].endswith("Z") and body["type"] == "price.updated"


def test_value_past_max_age_is_still_served_as_a_fallback() -> None:
    """The fallback outlives the freshness window: past max_age it is served, marked as only a fallback."""
    outcome, body = describe_last_good(state(), route=ROUTE, entity="sku-1", retention=RETENTION, now=T0 + 3600)
    assert outcome == FALLBACK and body["fresh"] is False and body["value"] == {"price": 49.99}


def test_value_older_than_the_retention_is_not_served() -> None:
    """Past last_good_retention the value is gone for callers (404 expired), not served as a fallback."""
    outcome, body = describe_last_good(state(), route=ROUTE, entity="sku-1", retention=RETENTION,
                                       now=T0 + RETENTION + 1)
    assert outcome == EXPIRED and "value" not in body


def test_age_counts_from_verification_when_the_event_had_no_time_and_types_inherit_max_age() -> None:
    """Without an event time the verification time starts the clock; a type without max_age takes the default."""
    outcome, body = describe_last_good(state(event_time=None, type="note.added"), route=ROUTE, entity="n",
                                       retention=RETENTION, now=T0 + 1 + 1800)
    assert outcome == FRESH and body["age_seconds"] == 1800 and body["max_age_seconds"] == 3600


def test_unknown_entity_and_non_json_values() -> None:
    """No state is not_found; a value that is not JSON is given in base64."""
    assert describe_last_good(None, route=ROUTE, entity="x", retention=RETENTION, now=T0)[0] == NOT_FOUND
    _, body = describe_last_good(state(b"\xff\x00"), route=ROUTE, entity="x", retention=RETENTION, now=T0)
    assert body["value"] is None and body["value_base64"] == "/wA="


@pytest.mark.parametrize("entity", ["sku-1", "order:42", "ü", "a/b", "x" * 300])
def test_owner_partition_is_kafkas_default_partitioner(entity: str) -> None:
    """Requests are routed to the partition a producer keyed by entity id writes to (murmur2, as Java's)."""
    partitions = list(range(6))
    assert entity_partition(entity, 6) == DefaultPartitioner()(entity.encode(), partitions, partitions)


def test_client_reads_values_and_refuses_anything_else() -> None:
    """The client turns 200 into a value and 404 into no value; any other answer is unavailable, never a value."""
    _, body = describe_last_good(state(), route=ROUTE, entity="sku-1", retention=RETENTION, now=T0 + 3600)
    good = parse_response(200, orjson.dumps(body), route="prices", entity="sku-1")
    assert good is not None and good.is_fallback and good.value == {"price": 49.99}
    assert parse_response(404, b'{"error": "not_found"}', route="prices", entity="x") is None
    for status, raw in ((503, b'{"error": "unavailable"}'), (200, b"<html>"), (404, b'{"error": "unknown_route"}')):
        with pytest.raises(LastKnownGoodUnavailable):
            parse_response(status, raw, route="prices", entity="x")


def test_a_value_nested_1000_levels_deep_is_answered_as_its_bytes() -> None:
    """A last-known-good value deeper than JSON output allows is served as value_base64, not a server error."""
    import base64

    deep = b'{"a":' * 1000 + b"1" + b"}" * 1000
    outcome, body = describe_last_good(state(deep), route=ROUTE, entity="sku-1", retention=RETENTION, now=T0 + 30)
    assert outcome == FRESH
    assert body["value"] is None and base64.b64decode(body["value_base64"]) == deep
    assert orjson.dumps(body)
