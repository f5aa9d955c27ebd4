"""KIP-447 fencing for one transaction per worker step: not yet used by the runtime (docs/kip447-fencing.md, "Not
yet used: KIP-447 fencing for one transaction per worker": what the tests on the broker show, what the switch needs).

Today each input partition has a transactional producer of its own (app/runtime/loop.py `transactional_id`): a
new owner's InitProducerId for that id fences the old owner and aborts its open transaction. A producer shared by
all partitions of a worker cannot be fenced that way (its transactional id is the worker's, not the partition's);
KIP-447 fences through the consumer group instead:

- the offsets of a transaction are sent with the group's generation id, member id and group instance id
  (TxnOffsetCommit v3+): the group coordinator refuses a member of an older generation (ILLEGAL_GENERATION), one
  that left or was removed (UNKNOWN_MEMBER_ID) and a replaced static member (FENCED_INSTANCE_ID); the transaction
  then cannot commit those offsets (`FencedOffsets`, `fence_offsets`, `send_offsets`);
- a new owner reads its start offsets with OffsetFetch v7+ require_stable: while a transaction holding offsets
  for one of its partitions is open, the coordinator answers UNSTABLE_OFFSET_COMMIT and the reader waits until
  that transaction is committed or aborted (`fetch_stable_offsets`).

aiokafka 0.14 sends TxnOffsetCommit v0 only (no group membership: nothing fenced) and OffsetFetch up to v3 (no
require_stable). The requests here are its protocol layer's flexible structs; the v3 commit goes through
aiokafka's own transaction sender, whose TxnOffsetCommit step is replaced on one producer only (`fence_offsets`):
AddOffsetsToTxn, the commit's retries, EndTxn and the producer's transaction state stay aiokafka's.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
import types
from collections.abc import Iterable, Mapping
from typing import Any

import aiokafka.errors as Errors
from aiokafka.client import ConnectionGroup, CoordinationType
from aiokafka.producer.sender import TxnOffsetCommitHandler
from aiokafka.protocol.admin import ApiVersionRequest
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Boolean, CompactArray, CompactString, Int16, Int32, Int64, Schema, TaggedFields
from aiokafka.structs import OffsetAndMetadata, TopicPartition

TXN_OFFSET_COMMIT_KEY = 28
OFFSET_FETCH_KEY = 9

#: Error codes of the Kafka protocol that aiokafka 0.14 has no class for (or that this module tells apart).
NONE = 0
COORDINATOR_LOAD_IN_PROGRESS = 14
COORDINATOR_NOT_AVAILABLE = 15
NOT_COORDINATOR = 16
ILLEGAL_GENERATION = 22
UNKNOWN_MEMBER_ID = 25
FENCED_INSTANCE_ID = 82
UNSTABLE_OFFSET_COMMIT = 88
#: The answers of the group coordinator that mean: these offsets come from a member that no longer owns them.
FENCED_CODES = {ILLEGAL_GENERATION: "ILLEGAL_GENERATION", UNKNOWN_MEMBER_ID: "UNKNOWN_MEMBER_ID",
                FENCED_INSTANCE_ID: "FENCED_INSTANCE_ID"}
#: Answers to OffsetFetch after which the coordinator is looked up again and the fetch retried.
COORDINATOR_MOVED = frozenset({COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR})
#: committed_leader_epoch when the committer does not know it (aiokafka's records carry no leader epoch).
NO_LEADER_EPOCH = -1


#: The versions this module sends: TxnOffsetCommit v3 (Kafka 2.5+), OffsetFetch v7 (Kafka 2.5+).
NEEDED_VERSIONS = {TXN_OFFSET_COMMIT_KEY: 3, OFFSET_FETCH_KEY: 7}


async def missing_versions(client: Any) -> list[str]:
    """What each broker of `client`'s cluster (a started aiokafka client) lacks of NEEDED_VERSIONS, by its
    ApiVersions answer: empty where every broker can take this module's requests."""
    missing = []
    for broker in sorted(client.cluster.brokers(), key=lambda b: b.nodeId):
        response = await client.send(broker.nodeId, ApiVersionRequest())
        advertised = {key: (low, high) for key, low, high, *_ in response.api_versions}
        for key, version in NEEDED_VERSIONS.items():
            low, high = advertised.get(key, (0, -1))
            if not low <= version <= high:
                missing.append(f"broker {broker.nodeId}: API {key} v{version} (advertises {low}-{high})")
    return missing


# -- TxnOffsetCommit v3 (KIP-447), flexible ---------------------------------------------------------------------

class TxnOffsetCommitResponse_v3(Response):  # type: ignore[misc]  # aiokafka ships no type information
    API_KEY = TXN_OFFSET_COMMIT_KEY
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(
                ("partition_index", Int32),
                ("error_code", Int16),
                ("tags", TaggedFields),
            )),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitRequest_v3(RequestStruct):  # type: ignore[misc]  # aiokafka ships no type information
    FLEXIBLE_VERSION = True
    API_KEY = TXN_OFFSET_COMMIT_KEY
    API_VERSION = 3
    RESPONSE_TYPE = TxnOffsetCommitResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("group_id", CompactString("utf-8")),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", CompactString("utf-8")),
        ("group_instance_id", CompactString("utf-8")),  # nullable: None encodes as length 0
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(
                ("partition_index", Int32),
                ("committed_offset", Int64),
                ("committed_leader_epoch", Int32),
                ("committed_metadata", CompactString("utf-8")),
                ("tags", TaggedFields),
            )),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


@dataclasses.dataclass(frozen=True)
class GroupMetadata:
    """What a consumer group member commits under (the Java client's ConsumerGroupMetadata): taken when the
    records whose offsets are committed were fetched, not when the commit is sent, so that a rebalance in between
    fences the commit."""

    group_id: str
    generation_id: int
    member_id: str
    group_instance_id: str | None = None


def group_metadata(consumer: Any) -> GroupMetadata:
    """The group membership of a started aiokafka consumer that subscribed with a group id, as it is now."""
    coordinator = consumer._coordinator
    if coordinator is None or not hasattr(coordinator, "generation"):
        raise ValueError("the consumer is not a member of a group (no group_id, or not started)")
    return GroupMetadata(coordinator.group_id, coordinator.generation, coordinator.member_id,
                         coordinator._group_instance_id)


class FencedOffsets(dict[TopicPartition, OffsetAndMetadata]):
    """Offsets to commit in a transaction, with the group membership they are committed under: aiokafka's
    transaction manager keeps this very object in its queue and hands it to the sender's TxnOffsetCommit step,
    which `fence_offsets` makes send TxnOffsetCommit v3 for it."""

    def __init__(self, offsets: Mapping[TopicPartition, int], group: GroupMetadata) -> None:
        super().__init__((tp, OffsetAndMetadata(offset, "")) for tp, offset in offsets.items())
        self.group = group


def txn_offset_commit_v3(transactional_id: str, producer_id: int, producer_epoch: int,
                         offsets: FencedOffsets) -> TxnOffsetCommitRequest_v3:
    """The TxnOffsetCommit v3 request struct for `offsets` (topics and partitions in order)."""
    topics: dict[str, list[tuple[int, int, int, str, dict[int, bytes]]]] = collections.defaultdict(list)
    for tp, offset in sorted(offsets.items()):
        topics[tp.topic].append((tp.partition, offset.offset, NO_LEADER_EPOCH, offset.metadata, {}))
    group = offsets.group
    return TxnOffsetCommitRequest_v3(transactional_id, group.group_id, producer_id, producer_epoch,
                                     group.generation_id, group.member_id, group.group_instance_id,
                                     [(topic, partitions, {}) for topic, partitions in topics.items()], {})


@dataclasses.dataclass
class FencedTxnOffsetCommitRequest(Request[TxnOffsetCommitRequest_v3]):  # type: ignore[misc]  # no type information
    """aiokafka's request builder for TxnOffsetCommit v3. To a broker without v3 the connection refuses to send it
    (NotImplementedError from `Request.prepare`: the producer's sender stops, its transaction fails) rather than
    commit unfenced."""

    API_KEY = TXN_OFFSET_COMMIT_KEY
    struct: TxnOffsetCommitRequest_v3

    def build(self, request_struct_class: type[TxnOffsetCommitRequest_v3]) -> TxnOffsetCommitRequest_v3:
        return self.struct


class OffsetsFencedError(Errors.KafkaError):  # type: ignore[misc]  # aiokafka ships no type information
    """The group coordinator refused a transaction's offsets: their member is not (or no longer) the group's member
    of that generation. The transaction is in an abortable error: abort it; the partitions belong to another
    member now."""


class FencedTxnOffsetCommitHandler(TxnOffsetCommitHandler):  # type: ignore[misc]  # aiokafka ships no type info
    """aiokafka's TxnOffsetCommit step for `FencedOffsets`: sends v3 with their group membership; a fenced member's
    answer makes the transaction abortable (`OffsetsFencedError`) as the Java producer does, and its abort ends the
    broker's transaction (EndTxn); every other answer is handled by aiokafka's handler (retries, a fenced producer,
    authorization)."""

    def create_request(self) -> FencedTxnOffsetCommitRequest:
        txn_manager = self._sender._txn_manager
        return FencedTxnOffsetCommitRequest(txn_offset_commit_v3(
            txn_manager.transactional_id, txn_manager.producer_id, txn_manager.producer_epoch, self._offsets))

    def handle_response(self, resp: TxnOffsetCommitResponse_v3) -> float | None:
        errors = [(topic, [(partition, code) for partition, code, _ in partitions]) for topic, partitions, _ in
                  resp.topics]
        fenced = [(topic, partition, code) for topic, partitions in errors for partition, code in partitions
                  if code in FENCED_CODES]
        if fenced:
            group = self._offsets.group
            refused = ", ".join(f"{topic}[{partition}] {FENCED_CODES[code]}" for topic, partition, code in fenced)
            manager = self._sender._txn_manager
            # aiokafka's error_transaction forgets the partitions and the group the broker's transaction holds:
            # the abort that follows would then end it in the producer alone, without EndTxn, and the broker's
            # transaction (with the records already written) would go on into the next one and commit with it.
            # Kept, the abort sends EndTxn(ABORT) (tests/integration/test_fencing.py, the rebalance test).
            partitions, consumer_group = set(manager._txn_partitions), manager._txn_consumer_group
            manager.error_transaction(OffsetsFencedError(
                f"group {self._group_id} refused the offsets of member {group.member_id!r} generation "
                f"{group.generation_id}: {refused}"))
            manager._txn_partitions.update(partitions)
            manager._txn_consumer_group = consumer_group
            return None
        # aiokafka's handler reads v0's shape: (topic, [(partition, error_code)]).
        result: float | None = super().handle_response(types.SimpleNamespace(errors=errors))
        return result


def fence_offsets(producer: Any) -> None:
    """Make a transactional aiokafka producer send the offsets given as `FencedOffsets` with TxnOffsetCommit v3 (its
    other offsets still go as aiokafka sends them, v0). Idempotent; call it before the producer's first
    transaction."""
    sender = producer._sender
    original = sender._do_txn_offset_commit
    if getattr(original, "fences_offsets", False):
        return

    async def fenced_commit(offsets: Any, group_id: str) -> None:
        # aiokafka's Sender._do_txn_offset_commit, with the v3 handler for FencedOffsets.
        if not isinstance(offsets, FencedOffsets):
            await original(offsets, group_id)
            return
        if not offsets:
            return
        try:
            node_id = await sender._find_coordinator(CoordinationType.GROUP, group_id)
        except Errors.GroupAuthorizationFailedError as exc:
            sender._txn_manager.error_transaction(exc)
            return
        await FencedTxnOffsetCommitHandler(sender, offsets, group_id).do(node_id)

    fenced_commit.fences_offsets = True  # type: ignore[attr-defined]  # a mark on the function
    sender._do_txn_offset_commit = fenced_commit


def add_offsets(producer: Any, offsets: Mapping[TopicPartition, int], group: GroupMetadata) -> asyncio.Future[None]:
    """Hand `offsets` (the next offset to read of each partition) to the open transaction of `producer` (fenced:
    `fence_offsets`), committed under `group`'s membership; returns the future aiokafka resolves once the group
    coordinator took them (or sets to the refusal: `OffsetsFencedError`). What send_offsets_to_transaction does
    before it waits, without its validation's copy (which would drop the membership)."""
    if not getattr(producer._sender._do_txn_offset_commit, "fences_offsets", False):
        raise RuntimeError("fence_offsets(producer) first: aiokafka would send these offsets unfenced (v0)")
    manager = producer._txn_manager
    if manager is None or manager.transactional_id is None or not manager.is_in_transaction():
        raise Errors.IllegalOperation("not in the middle of a transaction")
    future: asyncio.Future[None] = manager.add_offsets_to_txn(FencedOffsets(offsets, group), group.group_id)
    return future


async def send_offsets(producer: Any, offsets: Mapping[TopicPartition, int], group: GroupMetadata) -> None:
    """`add_offsets`, and wait until the group coordinator took them; raises `OffsetsFencedError` if it refused."""
    await asyncio.shield(add_offsets(producer, offsets, group))


# -- OffsetFetch v7 require_stable (KIP-447), flexible ----------------------------------------------------------

class OffsetFetchResponse_v7(Response):  # type: ignore[misc]  # aiokafka ships no type information
    API_KEY = OFFSET_FETCH_KEY
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(
                ("partition_index", Int32),
                ("committed_offset", Int64),
                ("committed_leader_epoch", Int32),
                ("metadata", CompactString("utf-8")),
                ("error_code", Int16),
                ("tags", TaggedFields),
            )),
            ("tags", TaggedFields),
        )),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class OffsetFetchRequest_v7(RequestStruct):  # type: ignore[misc]  # aiokafka ships no type information
    FLEXIBLE_VERSION = True
    API_KEY = OFFSET_FETCH_KEY
    API_VERSION = 7
    RESPONSE_TYPE = OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        ("topics", CompactArray(  # nullable: None asks for every partition of the group
            ("name", CompactString("utf-8")),
            ("partition_indexes", CompactArray(Int32)),
            ("tags", TaggedFields),
        )),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


def offset_fetch_v7(group_id: str, partitions: Iterable[TopicPartition],
                    require_stable: bool = True) -> OffsetFetchRequest_v7:
    """The OffsetFetch v7 request struct for `partitions` of `group_id` (topics and partitions in order)."""
    topics: dict[str, list[int]] = collections.defaultdict(list)
    for tp in sorted(set(partitions)):
        topics[tp.topic].append(tp.partition)
    return OffsetFetchRequest_v7(group_id, [(topic, indexes, {}) for topic, indexes in topics.items()],
                                 require_stable, {})


@dataclasses.dataclass
class StableOffsetFetchRequest(Request[OffsetFetchRequest_v7]):  # type: ignore[misc]  # no type information
    """aiokafka's request builder for OffsetFetch v7 (NotImplementedError to a broker without v7)."""

    API_KEY = OFFSET_FETCH_KEY
    struct: OffsetFetchRequest_v7

    def build(self, request_struct_class: type[OffsetFetchRequest_v7]) -> OffsetFetchRequest_v7:
        return self.struct


class UnstableOffsetsError(Errors.KafkaError):  # type: ignore[misc]  # aiokafka ships no type information
    """No stable answer within the reader's deadline: a transaction holding offsets of these partitions stayed open
    (or the group coordinator could not be reached)."""


@dataclasses.dataclass(frozen=True)
class StableOffsets:
    """The committed offsets of a group's partitions once no open transaction holds offsets for them."""

    #: The next offset to read of each partition asked for; None where the group committed none.
    offsets: dict[TopicPartition, int | None]
    #: How many answers were UNSTABLE_OFFSET_COMMIT (each followed by a retry).
    unstable_answers: int
    #: Seconds from the first request to the stable answer.
    waited_s: float


async def fetch_stable_offsets(client: Any, group_id: str, partitions: Iterable[TopicPartition], *,
                               retry_backoff_s: float = 0.05, timeout: float = 120.0) -> StableOffsets:
    """The committed offsets of `partitions` in `group_id`, asked with OffsetFetch v7 require_stable on `client`
    (a started aiokafka client: a consumer's `_client`): while an open transaction holds offsets for one of them the
    coordinator answers UNSTABLE_OFFSET_COMMIT, and this asks again every `retry_backoff_s` until it is committed
    or aborted (by its producer, a new producer of its transactional id, or the coordinator at its timeout).
    A coordinator that moved or is not reachable yet is looked up again. Raises UnstableOffsetsError after
    `timeout` seconds, a KafkaError for any other refusal."""
    request = offset_fetch_v7(group_id, partitions)
    asked = {TopicPartition(topic, index) for topic, indexes, _ in request.topics for index in indexes}
    start = time.monotonic()
    unstable = 0
    node_id = None
    while True:
        try:
            if node_id is None:
                node_id = await client.coordinator_lookup(CoordinationType.GROUP, group_id)
            response = await client.send(node_id, StableOffsetFetchRequest(request),
                                         group=ConnectionGroup.COORDINATION)
        except Errors.KafkaError as exc:
            if not exc.retriable:
                raise
            response, node_id = None, None  # a connection lost, a coordinator not there yet: look it up again
        codes = {COORDINATOR_NOT_AVAILABLE} if response is None else (
            {response.error_code} | {code for _, partitions_, _ in response.topics for *_, code, _ in partitions_})
        if codes & COORDINATOR_MOVED:
            node_id = None
        elif UNSTABLE_OFFSET_COMMIT in codes:
            unstable += 1
        else:
            refused = codes - {NONE}
            if refused:
                raise Errors.for_code(min(refused))(f"OffsetFetch v7 of group {group_id}: error codes {refused}")
            offsets: dict[TopicPartition, int | None] = {
                TopicPartition(topic, index): (offset if offset >= 0 else None)
                for topic, partitions_, _ in response.topics for index, offset, *_ in partitions_}
            missing = asked - offsets.keys()
            if missing:
                raise Errors.KafkaError(f"OffsetFetch v7 of group {group_id} left out {sorted(missing)}")
            return StableOffsets({tp: offsets[tp] for tp in sorted(asked)}, unstable, time.monotonic() - start)
        if time.monotonic() - start > timeout:
            raise UnstableOffsetsError(f"group {group_id}: no stable answer for {sorted(asked)} within {timeout} s "
                                       f"({unstable} UNSTABLE_OFFSET_COMMIT answers)")
        await asyncio.sleep(retry_backoff_s)


async def stable_committed(consumer: Any, partitions: Iterable[TopicPartition] | None = None,
                           **options: Any) -> StableOffsets:
    """`fetch_stable_offsets` for a started aiokafka consumer's group: of `partitions`, or of its assignment."""
    chosen = consumer.assignment() if partitions is None else partitions
    return await fetch_stable_offsets(consumer._client, group_metadata(consumer).group_id, chosen, **options)
