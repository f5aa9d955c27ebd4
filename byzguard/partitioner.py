"""Kafka's default partitioner: where a record keyed by an entity id belongs.

Entity state is co-partitioned with the inputs, so a record is checked against the state of the partition
it was read from. That is the entity's state only if the producer placed the record where the Java client
(and aiokafka, and byzguard's own producer) place a keyed record: murmur2 of the key bytes, sign bit
cleared, modulo the partition count. librdkafka's default (`consistent_random`, CRC32) and most Go
clients place keys elsewhere; `misplaced` finds such records so the guard refuses or re-partitions them.
"""

from __future__ import annotations

import struct
from typing import Final

from byzguard.verdict import Code

__all__ = ["PARTITIONER_HINT", "misplaced", "murmur2", "partition_for"]

_SEED: Final = 0x9747B28C
_M: Final = 0x5BD1E995
_MASK: Final = 0xFFFFFFFF

#: What a producer that placed a record elsewhere should change (quoted in the refusal's detail).
PARTITIONER_HINT: Final = (
    "key by the entity id and partition with Kafka's default murmur2 partitioner: librdkafka-based clients "
    "(confluent-kafka for Python/Go/.NET, kcat -X) set partitioner=murmur2_random; segmentio/kafka-go uses "
    "Balancer: &kafka.Murmur2Balancer{}; kafkajs 2 is right by default, not with Partitioners.LegacyPartitioner "
    "(kafkajs 1 needs Partitioners.JavaCompatiblePartitioner); sarama needs a murmur2 (JVM-compatible) "
    "partitioner, its own hash partitioners are FNV-1a or CRC32; or produce to partition "
    "(murmur2(key) & 0x7fffffff) % partitions explicitly (ENVELOPE.md, Partitioning)"
)

# One struct per word count: unpacking every 4-byte word in one call is most of the speed-up over a
# byte-by-byte loop (entity ids are short, so the cache of structs stays small).
_WORDS: dict[int, struct.Struct] = {}

# A bounded cache of the masked hashes of recent keys: a hot entity's key is hashed once. Cleared when full
# (no LRU bookkeeping on the hot path): some 2 MB at most for ids of a few dozen bytes.
_CACHE_MAX: Final = 16_384
_cache: dict[bytes, int] = {}


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2) as an unsigned 32-bit integer."""
    length = len(data)
    h = _SEED ^ length
    words = length >> 2
    if words:
        unpack = _WORDS.get(words)
        if unpack is None:
            unpack = _WORDS[words] = struct.Struct(f"<{words}I")
        for k in unpack.unpack_from(data):
            k = (k * _M) & _MASK
            k ^= k >> 24
            h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    tail = length & 3
    if tail:
        base = length & ~3
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a record keyed `key` on a topic of `partitions`."""
    hashed = _cache.get(key)
    if hashed is None:
        hashed = murmur2(key) & 0x7FFFFFFF
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[key] = hashed
    return hashed % partitions


def misplaced(key: bytes | None, subject: str, partition: int, partitions: int) -> tuple[Code, str] | None:
    """Why a record read from `partition` of a topic of `partitions` is not where its entity's state is.

    `key` is the record key, which decoding has found equal to the subject (or taken as it). None when
    the record is where Kafka's default partitioner puts its key.
    """
    if key is None:
        return (Code.DECODE_KEY_MISMATCH,
                f"the record has no key: key it by the entity id (subject) {subject!r}, so that every record of "
                f"the entity lands in one partition and is checked against that entity's state")
    expected = partition_for(key, partitions)
    if expected == partition:
        return None
    return (Code.DECODE_WRONG_PARTITION,
            f"entity {subject!r} belongs in partition {expected} of {partitions} (Kafka's default murmur2 "
            f"partitioner), the record came from partition {partition}, where another partition's state would "
            f"judge it; {PARTITIONER_HINT}. Or let the route re-partition such records (partitioning: repartition)")
