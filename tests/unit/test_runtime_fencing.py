"""The wire form of app/runtime/fencing.py's KIP-447 requests (TxnOffsetCommit v3, OffsetFetch v7), byte for byte
as the Kafka protocol spells them, and its v3 handler's reading of the group coordinator's answers. What the broker
does with them is in tests/integration/test_fencing.py."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from aiokafka.producer.transaction_manager import TransactionManager
from aiokafka.protocol.api import RequestHeader_v2, ResponseHeader_v1
from aiokafka.structs import TopicPartition

from app.runtime import fencing
from app.runtime.fencing import (
    FencedOffsets,
    FencedTxnOffsetCommitHandler,
    FencedTxnOffsetCommitRequest,
    GroupMetadata,
    OffsetFetchRequest_v7,
    OffsetFetchResponse_v7,
    OffsetsFencedError,
    StableOffsetFetchRequest,
    TxnOffsetCommitRequest_v3,
    TxnOffsetCommitResponse_v3,
)

GROUP = GroupMetadata("g", 3, "m")
OUTPUT = TopicPartition("out", 0)


def i16(value: int) -> bytes:
    return struct.pack(">h", value)


def i32(value: int) -> bytes:
    return struct.pack(">i", value)


def i64(value: int) -> bytes:
    return struct.pack(">q", value)


def compact(text: str | None) -> bytes:
    """COMPACT_(NULLABLE_)STRING of short strings: unsigned varint length + 1 (0: null), then the bytes."""
    return b"\x00" if text is None else bytes([len(text) + 1]) + text.encode()


NO_TAGS = b"\x00"


def test_txn_offset_commit_v3_bytes_are_the_protocols() -> None:
    """transactional_id group_id producer_id producer_epoch generation_id member_id group_instance_id [topics]
    TAG_BUFFER, compact strings and arrays, a null group instance id as length 0 (kafka's
    TxnOffsetCommitRequest.json, v3)."""
    offsets = FencedOffsets({TopicPartition("t", 1): 9, TopicPartition("t", 0): 5}, GROUP)
    request = fencing.txn_offset_commit_v3("tx", 7, 1, offsets)
    expected = (compact("tx") + compact("g") + i64(7) + i16(1) + i32(3) + compact("m") + compact(None)
                + b"\x02" + compact("t") + b"\x03"
                + i32(0) + i64(5) + i32(-1) + compact("") + NO_TAGS
                + i32(1) + i64(9) + i32(-1) + compact("") + NO_TAGS
                + NO_TAGS + NO_TAGS)
    assert request.encode() == expected
    assert TxnOffsetCommitRequest_v3.decode(expected) == request
    assert isinstance(request.build_request_header(1, "c"), RequestHeader_v2)  # flexible: the header has tags
    assert isinstance(request.parse_response_header(i32(1) + NO_TAGS), ResponseHeader_v1)


def test_txn_offset_commit_v3_carries_a_static_member_id() -> None:
    request = fencing.txn_offset_commit_v3("tx", 7, 1, FencedOffsets({TopicPartition("t", 0): 5},
                                                                     GroupMetadata("g", 3, "m", "worker-1")))
    decoded = TxnOffsetCommitRequest_v3.decode(request.encode())
    assert (decoded.generation_id, decoded.member_id, decoded.group_instance_id) == (3, "m", "worker-1")


def test_txn_offset_commit_v3_response_is_read() -> None:
    """throttle_time_ms [topics [partitions partition_index error_code TAG_BUFFER] TAG_BUFFER] TAG_BUFFER."""
    raw = i32(0) + b"\x02" + compact("t") + b"\x02" + i32(0) + i16(22) + NO_TAGS + NO_TAGS + NO_TAGS
    response = TxnOffsetCommitResponse_v3.decode(raw)
    assert response.topics == [("t", [(0, 22, {})], {})]
    assert response.encode() == raw


def test_offset_fetch_v7_bytes_are_the_protocols() -> None:
    """group_id [topics name [partition_indexes] TAG_BUFFER] require_stable TAG_BUFFER (OffsetFetchRequest.json,
    v7); partitions sorted and deduplicated."""
    request = fencing.offset_fetch_v7("g", [TopicPartition("t", 1), TopicPartition("t", 0), TopicPartition("t", 1)])
    expected = compact("g") + b"\x02" + compact("t") + b"\x03" + i32(0) + i32(1) + NO_TAGS + b"\x01" + NO_TAGS
    assert request.encode() == expected
    assert OffsetFetchRequest_v7.decode(expected) == request
    assert fencing.offset_fetch_v7("g", [], require_stable=False).encode() == compact("g") + b"\x01\x00" + NO_TAGS


def test_offset_fetch_v7_response_is_read() -> None:
    """throttle_time_ms [topics [partitions partition_index committed_offset committed_leader_epoch metadata
    error_code]] error_code: an unstable partition's code is per partition."""
    raw = (i32(0) + b"\x02" + compact("t") + b"\x02" + i32(0) + i64(-1) + i32(-1) + compact("") + i16(88) + NO_TAGS
           + NO_TAGS + i16(0) + NO_TAGS)
    response = OffsetFetchResponse_v7.decode(raw)
    assert response.topics == [("t", [(0, -1, -1, "", 88, {})], {})]
    assert response.error_code == 0


@pytest.mark.parametrize(("builder", "struct_", "key"), [
    (FencedTxnOffsetCommitRequest, fencing.txn_offset_commit_v3("tx", 7, 1, FencedOffsets({}, GROUP)), 28),
    (StableOffsetFetchRequest, fencing.offset_fetch_v7("g", []), 9),
])
def test_the_request_goes_only_to_a_broker_that_has_its_version(builder: Any, struct_: Any, key: int) -> None:
    """aiokafka's connection picks the struct by the versions the broker advertised (ApiVersions): sent to a broker
    that has it, refused (not sent in an older version) by one without."""
    assert builder(struct_).prepare({key: (0, 9)}) is struct_
    with pytest.raises(NotImplementedError):
        builder(struct_).prepare({key: (0, 2)})


def test_fenced_offsets_carry_their_membership() -> None:
    offsets = FencedOffsets({TopicPartition("t", 0): 5}, GROUP)
    assert offsets.group is GROUP
    assert offsets[TopicPartition("t", 0)].offset == 5


class _Sender:
    """What aiokafka's handlers read of their sender: its transaction manager and retry backoff."""

    def __init__(self, manager: TransactionManager) -> None:
        self._txn_manager = manager
        self._retry_backoff = 0.1
        self.dead: list[Any] = []

    def _coordinator_dead(self, kind: Any) -> None:
        self.dead.append(kind)


async def _handler_in_transaction(offsets: FencedOffsets) -> tuple[FencedTxnOffsetCommitHandler, TransactionManager,
                                                                   Any]:
    manager = TransactionManager("tx", 60000)
    manager.set_pid_and_epoch(7, 1)
    manager.begin_transaction()
    manager.maybe_add_partition_to_txn(OUTPUT)
    manager.partition_added(OUTPUT)  # a record of the transaction was written there
    future = manager.add_offsets_to_txn(offsets, offsets.group.group_id)
    manager.consumer_group_added(offsets.group.group_id)
    return FencedTxnOffsetCommitHandler(_Sender(manager), offsets, offsets.group.group_id), manager, future


async def test_handler_builds_v3_from_the_transaction_and_the_offsets() -> None:
    offsets = FencedOffsets({TopicPartition("t", 0): 5}, GROUP)
    handler, _, _ = await _handler_in_transaction(offsets)
    request = handler.create_request()
    assert isinstance(request, FencedTxnOffsetCommitRequest)
    assert (request.struct.transactional_id, request.struct.producer_id, request.struct.producer_epoch,
            request.struct.generation_id, request.struct.member_id) == ("tx", 7, 1, 3, "m")


@pytest.mark.parametrize("code", sorted(fencing.FENCED_CODES))
async def test_handler_makes_a_fenced_members_transaction_abortable(code: int) -> None:
    """ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID: the offsets' future and the transaction fail with
    OffsetsFencedError (abortable, as in the Java producer), the sender goes on (no exception out of the handler),
    and the transaction still knows what the broker's holds, so that its abort sends EndTxn (aiokafka's
    error_transaction forgets it: the abort would end nothing on the broker)."""
    offsets = FencedOffsets({TopicPartition("t", 0): 5, TopicPartition("t", 1): 6}, GROUP)
    handler, manager, future = await _handler_in_transaction(offsets)
    answer = TxnOffsetCommitResponse_v3(0, [("t", [(0, 0, {}), (1, code, {})], {})], {})
    assert handler.handle_response(answer) is None
    with pytest.raises(OffsetsFencedError, match=fencing.FENCED_CODES[code]):
        future.result()
    with pytest.raises(OffsetsFencedError):
        manager.wait_for_transaction_end().result()
    assert manager.txn_partitions == {OUTPUT} and not manager.is_empty_transaction()
    manager.aborting_transaction()  # the way out: abort, sent to the broker (not an empty transaction)
    assert manager.needs_transaction_commit() is not None


async def test_handler_leaves_other_answers_to_aiokafka() -> None:
    """Accepted offsets are marked committed; a coordinator that moved is looked up again and the request retried."""
    offsets = FencedOffsets({TopicPartition("t", 0): 5}, GROUP)
    handler, _, future = await _handler_in_transaction(offsets)
    assert handler.handle_response(TxnOffsetCommitResponse_v3(0, [("t", [(0, 16, {})], {})], {})) == 0.1
    assert handler._sender.dead  # NOT_COORDINATOR
    assert not future.done()
    assert handler.handle_response(TxnOffsetCommitResponse_v3(0, [("t", [(0, 0, {})], {})], {})) is None
    assert future.done() and future.exception() is None


class _Coordinator:
    """A stand-in for aiokafka's client in the reader's retry logic (not Kafka's behaviour: that is the integration
    test's): answers OffsetFetch v7 from a script of error codes for partition 0."""

    def __init__(self, script: list[int | Exception]) -> None:
        self.script = script
        self.lookups = 0

    async def coordinator_lookup(self, kind: Any, key: str) -> int:
        self.lookups += 1
        return 1

    async def send(self, node_id: int, request: Any, group: Any = None) -> OffsetFetchResponse_v7:
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        offset = 5 if step == 0 else -1
        return OffsetFetchResponse_v7(0, [("t", [(0, offset, -1, "", step, {}), (1, -1, -1, "", 0, {})], {})], 0, {})


async def test_stable_reader_retries_unstable_answers_and_a_moved_coordinator() -> None:
    from aiokafka.errors import NodeNotReadyError

    client = _Coordinator([fencing.NOT_COORDINATOR, fencing.UNSTABLE_OFFSET_COMMIT, NodeNotReadyError(),
                           fencing.UNSTABLE_OFFSET_COMMIT, 0])
    tps = [TopicPartition("t", 0), TopicPartition("t", 1)]
    stable = await fencing.fetch_stable_offsets(client, "g", tps, retry_backoff_s=0)
    assert stable.offsets == {tps[0]: 5, tps[1]: None}
    assert stable.unstable_answers == 2
    assert client.lookups == 3 and client.script == []


async def test_stable_reader_gives_up_at_its_deadline_and_on_a_refusal() -> None:
    from aiokafka.errors import GroupAuthorizationFailedError

    with pytest.raises(fencing.UnstableOffsetsError, match=r"within 0.03 s \([1-9]\d* UNSTABLE_OFFSET_COMMIT"):
        await fencing.fetch_stable_offsets(_Coordinator([fencing.UNSTABLE_OFFSET_COMMIT] * 1000), "g",
                                           [TopicPartition("t", 0)], retry_backoff_s=0.02, timeout=0.03)
    with pytest.raises(GroupAuthorizationFailedError):
        await fencing.fetch_stable_offsets(_Coordinator([30]), "g", [TopicPartition("t", 0)])
