"""app/runtime/stages.py without a broker: what a repartitioning route's forward stage maps a record to, and how
the verify stage reads a repartitioned copy. (Their batches, transactions and the audit join's state run on the real
broker: tests/integration/test_partitioning.py, test_audit.py, tests/chaos/test_crash.py.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.runtime.stages import RouteRepartition, record_in, repartitions, verify_topics
from byzguard.config import GuardConfig, load
from byzguard.guard import RecordIn
from byzguard.partitioner import partition_for
from byzguard.routing import H_REPARTITIONED_FROM, repartitioned_from
from topics import route_repartition_topic_name

CONFIG = """\
routes:
  - {name: r, inputs: [in, in2], verified_topic: out, quarantine_topic: bad, partitions: 3,
     partitioning: repartition, types: {order.confirmed: {}, payment.captured: {}}}
  - {name: plain, inputs: [p_in], verified_topic: p_out, quarantine_topic: p_bad, types: {t: {}}}
audits:
  - name: paid
    left: {name: orders, topic: out, type: order.confirmed, key: data.paymentId, value: data.total}
    right: {name: payments, topic: out, type: payment.captured, key: data.paymentId, value: data.amount}
    within: 60s
    partitions: 5
"""


def _config(tmp_path: Path) -> GuardConfig:
    path = tmp_path / "byzguard.yaml"
    path.write_text(CONFIG)
    return load(path)


@dataclass
class Msg:
    """A consumed message as aiokafka gives it (timestamps in ms)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 1_800_000_000_000


class Out:
    """What a stage adds to its batch, in order."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
            headers: Any = ()) -> None:
        self.records.append((topic, partition, key, value, list(headers)))


def test_a_repartitioning_route_is_verified_from_its_repartition_topic_and_forwarded_from_its_inputs(
        tmp_path: Path) -> None:
    """The verify stage of a route with partitioning: repartition reads `<app_id>-<route>-entities-repartition`
    (the faust runtime's topic), its forward stage reads the route's inputs; other routes read their inputs."""
    config = _config(tmp_path)
    r, plain = config.routes
    assert verify_topics("app", r) == ["app-r-entities-repartition"] == [route_repartition_topic_name("app", r)]
    assert verify_topics("app", plain) == ["p_in"]
    [stage] = repartitions("app", config)
    assert stage.topics == ("in", "in2") and stage.target == "app-r-entities-repartition"


def test_forwarding_copies_a_record_untouched_to_its_keys_murmur2_partition_with_its_origin(tmp_path: Path) -> None:
    """A keyed input record goes to the repartition topic's partition of its key, key, value and producer headers
    unchanged, plus its input coordinates (seconds); the verify stage then judges it as that input record, at
    the partition it was copied to."""
    route = _config(tmp_path).routes[0]
    stage = RouteRepartition("app", route)
    stage.configure({}, {})
    out = Out()
    msg = Msg("in2", 0, 41, b"order-7", b"{}", [("ce_id", b"e1")])
    stage.forward(msg, out, 0.0)  # type: ignore[arg-type]
    [(topic, partition, key, value, headers)] = out.records
    assert (topic, partition, key, value) == ("app-r-entities-repartition", partition_for(b"order-7", 3),
                                              b"order-7", b"{}")
    assert headers[0] == ("ce_id", b"e1")
    assert repartitioned_from(headers) == ("in2", 0, 41, 1_800_000_000.0)
    copy = Msg(topic, partition, 9, key, value, headers)
    record = record_in(copy, route)
    assert (record.topic, record.partition, record.offset, record.timestamp, record.home) == (
        "in2", 0, 41, 1_800_000_000.0, partition)


def test_a_record_without_a_key_keeps_its_partition_number(tmp_path: Path) -> None:
    """Without a key there is no entity partition: the copy keeps the input's partition number (modulo the
    route's partitions), where the verify stage refuses it (decode.key_mismatch)."""
    stage = RouteRepartition("app", _config(tmp_path).routes[0])
    out = Out()
    stage.forward(Msg("in", 4, 0, None, b"{}"), out, 0.0)  # type: ignore[arg-type]
    assert out.records[0][:3] == ("app-r-entities-repartition", 1, None)


def test_a_record_whose_copy_cannot_fit_is_quarantined_as_a_stub_at_its_entitys_partition(tmp_path: Path) -> None:
    """A record that would not fit the repartition or quarantine topic with byzguard's headers is not forwarded:
    a bounded stub goes to the quarantine partition of its entity (output.too_large); one that fits is copied."""
    stage = RouteRepartition("app", _config(tmp_path).routes[0])
    stage.configure({"app-r-entities-repartition": 100_000, "bad": 40_000}, {})
    out = Out()
    stage.forward(Msg("in", 0, 3, b"order-7", b"x" * 30_000), out, 0.0)  # type: ignore[arg-type]
    stage.forward(Msg("in", 0, 4, b"order-7", b"x" * 100), out, 0.0)  # type: ignore[arg-type]
    (stub_topic, stub_partition, _, stub_value, _), (copy_topic, *_) = out.records
    assert (stub_topic, stub_partition) == ("bad", partition_for(b"order-7", 3))
    assert b"output.too_large" in (stub_value or b"") and len(stub_value or b"") < 40_000
    assert copy_topic == "app-r-entities-repartition"


def test_a_plain_routes_record_is_judged_where_it_was_read(tmp_path: Path) -> None:
    """On a route that does not repartition, the record is the message itself (aiokafka's ms become seconds)."""
    plain = _config(tmp_path).routes[1]
    record = record_in(Msg("p_in", 2, 7, b"k", b"{}", [(H_REPARTITIONED_FROM, b'["x",0,0,1.0]')]), plain)
    assert (record.topic, record.partition, record.offset, record.timestamp, record.home) == (
        "p_in", 2, 7, 1_800_000_000.0, 2)


def test_record_in_builds_the_record_its_dataclass_would_on_either_kind_of_route(tmp_path: Path) -> None:
    """record_in builds the RecordIn of a consumed message: every field equals what RecordIn(...) of them holds."""
    config = _config(tmp_path)
    repartitioning, plain = config.routes
    headers = [("a", b"1"), (H_REPARTITIONED_FROM, b'["in2",1,42,1799999999.5]')]
    copied = record_in(Msg("app-r-entities-repartition", 2, 9, b"k", b"v", headers), repartitioning)
    assert copied == RecordIn(b"k", b"v", headers, "in2", 1, 42, 1799999999.5, 3, 2)
    assert copied.home == 2
    read = record_in(Msg("p_in", 5, 7, None, None), plain)
    assert read == RecordIn(None, None, (), "p_in", 5, 7, 1_800_000_000.0, plain.partitions, None)
