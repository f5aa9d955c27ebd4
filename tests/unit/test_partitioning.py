"""Placement: Kafka's murmur2 partitioner, and the guard's refusal of records outside their entity's partition."""

from __future__ import annotations

import os
import random
import zlib

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from byzguard import partitioner
from byzguard.config import Partitioning
from byzguard.errors import ConfigError
from byzguard.guard import RecordIn, Routed
from byzguard.integrity import HMAC_SHA256
from byzguard.partitioner import misplaced, murmur2, partition_for
from byzguard.routing import (
    H_ORIGINAL_OFFSET,
    H_ORIGINAL_PARTITION,
    H_ORIGINAL_TOPIC,
    H_REPARTITIONED_FROM,
    repartition_headers,
    repartitioned_from,
)
from byzguard.stamp import Stamped, Stamper
from byzguard.verdict import Code, Outcome

from .conftest import PRICING_KEY, Harness, make_config

NOW = 1_800_000_000.0
PARTITIONS = 4

# Java's org.apache.kafka.common.utils.UtilsTest.testMurmur2 (signed 32-bit results).
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def crc32_partition(key: bytes, partitions: int) -> int:
    """Where librdkafka's default `consistent_random` partitioner puts a keyed record."""
    return zlib.crc32(key) % partitions


# --- murmur2 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "java"), sorted(JAVA_MURMUR2.items()))
def test_murmur2_matches_java(key: bytes, java: int) -> None:
    """murmur2 gives the Java client's values (as unsigned 32-bit integers)."""
    assert murmur2(key) == java & 0xFFFFFFFF


def test_murmur2_matches_aiokafka_for_every_length() -> None:
    """murmur2 agrees with aiokafka's reference implementation for keys of 0 to 80 bytes, every tail length."""
    rng = random.Random(7)
    for length in range(81):
        for _ in range(20):
            key = bytes(rng.getrandbits(8) for _ in range(length))
            assert murmur2(key) == aiokafka_murmur2(key), key


def test_partition_for_matches_aiokafkas_default_partitioner() -> None:
    """partition_for places keys where aiokafka's (and Java's) default partitioner does."""
    default = DefaultPartitioner()
    for count in (1, 3, 4, 8, 12, 100):
        parts = list(range(count))
        for i in range(300):
            key = f"sku-{i}".encode()
            assert partition_for(key, count) == default(key, parts, parts)


def test_partition_cache_is_bounded() -> None:
    """The key cache never grows past its cap, and answers stay right after it was cleared."""
    for _ in range(partitioner._CACHE_MAX + 100):
        key = os.urandom(12)
        assert partition_for(key, 8) == (aiokafka_murmur2(key) & 0x7FFFFFFF) % 8
    assert len(partitioner._cache) <= partitioner._CACHE_MAX


# --- misplaced --------------------------------------------------------------------------------------------

def test_misplaced_accepts_the_murmur2_partition() -> None:
    """A key in the partition murmur2 gives it is where its entity's state is."""
    for i in range(50):
        key = f"entity-{i}".encode()
        assert misplaced(key, key.decode(), partition_for(key, PARTITIONS), PARTITIONS) is None


def test_misplaced_refuses_another_partition_with_what_to_set() -> None:
    """A key anywhere else is decode.wrong_partition, and the detail names the partition and the client setting."""
    key = b"sku-1"
    right = partition_for(key, PARTITIONS)
    for wrong in set(range(PARTITIONS)) - {right}:
        found = misplaced(key, "sku-1", wrong, PARTITIONS)
        assert found is not None
        code, detail = found
        assert code is Code.DECODE_WRONG_PARTITION
        assert f"partition {right} of {PARTITIONS}" in detail and f"from partition {wrong}" in detail
        assert "partitioner=murmur2_random" in detail and "partitioning: repartition" in detail


def test_misplaced_refuses_a_null_key() -> None:
    """A record without a key is decode.key_mismatch on every partition, even the one its subject maps to."""
    for partition in range(PARTITIONS):
        found = misplaced(None, "sku-1", partition, PARTITIONS)
        assert found is not None and found[0] is Code.DECODE_KEY_MISMATCH


# --- the guard --------------------------------------------------------------------------------------------

def signed(version: int, subject: str = "sku-1") -> Stamped:
    """A signed (hmac-sha256) event of `subject` at `version`."""
    return Stamper("pricing", algorithm=HMAC_SHA256, key=PRICING_KEY).binary(
        {"price": 10.0 + version}, type="signed.thing", subject=subject, version=version, time=NOW, lamport=False)


def feed_at(h: Harness, s: Stamped, partition: int, *, key: bytes | str | None = "same",
            read_partition: int | None = None) -> Routed:
    """Process a record read from `partition` of a topic of PARTITIONS partitions."""
    h.offset += 1
    record = RecordIn(s.key if key == "same" else key, s.value, list(s.headers), "in",  # type: ignore[arg-type]
                      partition, h.offset, NOW, PARTITIONS, read_partition)
    return h.apply(h.guard.process(record, h.route, h.state, now=NOW)).first


def test_records_in_their_partition_are_verified(harness: Harness) -> None:
    """Signed events read from the partition murmur2 gives their key are verified as before."""
    home = partition_for(b"sku-1", PARTITIONS)
    for version in (1, 2, 3):
        assert feed_at(harness, signed(version), home).decision.outcome is Outcome.VERIFIED


def test_stale_version_from_a_crc32_producer_is_refused_not_verified(harness: Harness) -> None:
    """An older version placed by CRC32 (librdkafka's default) in a partition without the entity's state is refused."""
    home = partition_for(b"sku-1", PARTITIONS)
    elsewhere = next(p for p in range(PARTITIONS) if p != home)
    for version in (1, 2, 3):
        feed_at(harness, signed(version), home)
    before = dict(harness.entities)
    routed = feed_at(harness, signed(2), elsewhere)
    assert routed.decision.outcome is Outcome.QUARANTINED
    assert [r.code for r in routed.decision.reasons] == [Code.DECODE_WRONG_PARTITION]
    assert routed.verified_headers is None and routed.quarantine_headers is not None
    assert harness.entities == before and not harness.last.writes


def test_crc32_placement_is_refused_wherever_it_differs() -> None:
    """Over many keys, every record CRC32 places off its murmur2 partition is refused, and only those."""
    h = Harness()
    refused = placed_off = 0
    for i in range(200):
        subject = f"sku-{i}"
        partition = crc32_partition(subject.encode(), PARTITIONS)
        routed = feed_at(h, signed(1, subject), partition)
        off = partition != partition_for(subject.encode(), PARTITIONS)
        placed_off += off
        refused += routed.decision.outcome is Outcome.QUARANTINED
        assert (routed.decision.outcome is Outcome.QUARANTINED) == off, subject
    assert placed_off > 100 and refused == placed_off


@pytest.mark.parametrize("partition", range(PARTITIONS))
def test_null_key_signed_event_is_refused_on_every_partition(partition: int) -> None:
    """A signed event with a null record key is decode.key_mismatch on every partition, and writes no state."""
    h = Harness()
    routed = feed_at(h, signed(1), partition, key=None)
    assert [r.code for r in routed.decision.reasons] == [Code.DECODE_KEY_MISMATCH]
    assert routed.decision.outcome is Outcome.QUARANTINED and not h.last.writes


def test_null_key_stale_version_is_refused_where_state_is_missing() -> None:
    """A stale version sent with a null key is refused on every partition, not only on the entity's own one."""
    h = Harness()
    home = partition_for(b"sku-1", PARTITIONS)
    for version in (1, 2, 3):
        feed_at(h, signed(version), home)
    for partition in range(PARTITIONS):
        routed = feed_at(h, signed(2), partition, key=None)
        assert routed.decision.outcome is Outcome.QUARANTINED
        assert [r.code for r in routed.decision.reasons] == [Code.DECODE_KEY_MISMATCH]


def test_key_other_than_the_subject_is_refused(harness: Harness) -> None:
    """A record keyed by something other than its subject stays decode.key_mismatch, placed right or not."""
    routed = feed_at(harness, signed(1), partition_for(b"other", PARTITIONS), key=b"other")
    assert [r.code for r in routed.decision.reasons] == [Code.DECODE_KEY_MISMATCH]


def test_records_not_read_from_a_topic_are_not_placed(harness: Harness) -> None:
    """A record without a partition count (a sample from a file) gets no placement check."""
    s = signed(1)
    elsewhere = (partition_for(b"sku-1", PARTITIONS) + 1) % PARTITIONS
    routed = harness.apply(harness.guard.process(
        RecordIn(s.key, s.value, list(s.headers), "in", elsewhere, 1, NOW), harness.route, harness.state,
        now=NOW)).first
    assert routed.decision.outcome is Outcome.VERIFIED


def test_repartitioned_record_is_placed_by_where_it_was_read(harness: Harness) -> None:
    """A re-partitioned record is judged where it was read, and its quarantine record names where it was produced."""
    home = partition_for(b"sku-1", PARTITIONS)
    elsewhere = (home + 1) % PARTITIONS
    assert feed_at(harness, signed(1), elsewhere, read_partition=home).decision.outcome is Outcome.VERIFIED
    feed_at(harness, signed(2), home)
    routed = feed_at(harness, signed(1), elsewhere, read_partition=home)  # stale: version 1 after 2
    assert [r.code for r in routed.decision.reasons] == [Code.VERSION_REGRESSION]
    headers = dict(routed.quarantine_headers or [])
    assert headers[H_ORIGINAL_TOPIC] == b"in" and headers[H_ORIGINAL_PARTITION] == str(elsewhere).encode()
    assert headers[H_ORIGINAL_OFFSET] == str(harness.offset).encode()


# --- re-partitioning: the route option, the coordinates header, held records ------------------------------

ROUTE = """
routes:
  - name: main
    inputs: [in]
    verified_topic: out
    quarantine_topic: bad
    types: {{thing: {{}}}}
{extra}
"""


def test_routes_refuse_misplaced_records_unless_they_opt_in() -> None:
    """A route refuses misplaced records by default; `partitioning: repartition` opts in; other values are refused."""
    assert make_config(ROUTE.format(extra="")).routes[0].partitioning is Partitioning.REFUSE
    opted = make_config(ROUTE.format(extra="    partitioning: repartition"))
    assert opted.routes[0].partitioning is Partitioning.REPARTITION
    with pytest.raises(ConfigError, match="partitioning"):
        make_config(ROUTE.format(extra="    partitioning: guess"))


def test_repartition_headers_keep_the_producers_headers_and_add_the_coordinates() -> None:
    """The copy keeps every producer header in order and carries the input coordinates, read back exactly."""
    own = [("ce_id", b"e-1"), ("x", b"1"), ("x", b"2")]
    headers = repartition_headers(own, "prices", 3, 1234, 1_800_000_000.123)
    assert headers[:-1] == own
    assert repartitioned_from(headers) == ("prices", 3, 1234, 1_800_000_000.123)
    assert repartitioned_from(repartition_headers({"ce_id": b"e-1"}, "t", 0, 0, None)) == ("t", 0, 0, None)
    assert repartitioned_from(own) is None


def test_a_coordinates_header_of_another_shape_reads_as_none() -> None:
    """A coordinates header that repartition_headers did not write (a hostile producer on the repartition topic)
    reads as no coordinates, whatever its shape: it never raises into the stage that reads it."""
    for raw in (b'["t", "x", 1, null]', b'["t", 0, null, null]', b'["t", 0, 1, "soon"]', b'["t", [], 1, null]',
                b'["t", 0, 1]', b"7", b"{}", b"not json"):
        assert repartitioned_from([(H_REPARTITIONED_FROM, raw)]) is None, raw


def test_a_producers_own_coordinates_header_is_replaced() -> None:
    """A coordinates header the producer sent itself is dropped: only the guard's copy names the input."""
    forged = [("ce_id", b"e-1"), (H_REPARTITIONED_FROM, b'["elsewhere",9,9,null]')]
    headers = repartition_headers(forged, "prices", 1, 7, None)
    assert [name for name, _ in headers].count(H_REPARTITIONED_FROM) == 1
    assert repartitioned_from(headers) == ("prices", 1, 7, None)


def test_held_records_keep_the_partition_they_were_read_from() -> None:
    """A record held in the causal buffer comes back with its read partition, and is not placed again."""
    record = RecordIn(b"k", b"v", [("h", b"1")], "in", 2, 10, 5.0, PARTITIONS, 1)
    back = RecordIn.from_bytes(record.to_bytes())
    assert (back.partition, back.read_partition, back.home, back.partitions) == (2, 1, 1, None)
    older = RecordIn.from_bytes(b'["aw==","dg==",[],"in",2,10,5.0]')  # held by a version without it
    assert (older.home, older.read_partition) == (2, None)


def test_lamport_marks_of_repartitioned_records_are_kept_per_input_partition() -> None:
    """Re-partitioned records of one source from two input partitions may arrive in any order between the two, and
    are not lamport.regression; a regression within one input partition still is."""
    h = Harness()
    stamper = Stamper("pricing", algorithm=HMAC_SHA256, key=PRICING_KEY, clock=None)  # a plain counter: 1, 2, 3

    def event(subject: str, clock: Stamper = stamper) -> Stamped:
        return clock.binary({"price": 1.0}, type="signed.thing", subject=subject, version=1, time=NOW)

    def from_input(partition: int, s: Stamped) -> Routed:
        """Read from the repartition topic where the subject belongs, produced to input `partition`."""
        return feed_at(h, s, partition, read_partition=partition_for(s.key, PARTITIONS))

    one, two, three = event("sku-a"), event("sku-b"), event("sku-c")  # Lamport times 1, 2, 3
    assert from_input(1, two).decision.outcome is Outcome.VERIFIED
    assert from_input(0, one).decision.outcome is Outcome.VERIFIED  # input 0 had seen nothing later
    assert from_input(0, three).decision.outcome is Outcome.VERIFIED
    again = Stamper("pricing", algorithm=HMAC_SHA256, key=PRICING_KEY, lamport=1, clock=None,
                    instance=stamper.instance)  # the same writer, its clock set back
    routed = from_input(0, event("sku-d", again))  # Lamport time 2 after 3 on input 0
    assert [r.code for r in routed.decision.reasons] == [Code.LAMPORT_REGRESSION]
