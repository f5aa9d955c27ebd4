"""app/runtime/owners.py without a broker: the batched runtime's assignor assigns as aiokafka's range assignor and
gives every member the map of every partition to its owner's web URL; a worker reads an entity's stored state
only where it owns and has restored the partition, and otherwise names the owner or says why nobody answers.
(Two workers forwarding to each other on the real broker: tests/integration/test_entities.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocol, ConsumerProtocolMemberMetadata

from app.runtime.loop import BatchedRuntime
from app.runtime.owners import (
    OwnerDirectory,
    assignor_for,
    decode_member,
    decode_owners,
    encode_member,
    encode_owners,
    owner_map,
    read_entity,
)
from app.runtime.state import PartitionState
from byzguard.config import GuardConfig, load
from byzguard.guard import ENTITIES, Guard

W1, W2 = "http://10.0.0.1:6066", "http://10.0.0.2:6066"


@pytest.fixture
def config(tmp_path: Path) -> GuardConfig:
    path = tmp_path / "byzguard.yaml"
    path.write_text("routes:\n  - {name: r, inputs: [in-a, in-b], verified_topic: out, quarantine_topic: bad,\n"
                    "      partitions: 4, types: {t: {}}}\n")
    return load(path)


class Cluster:
    """The one thing the range assignor asks of aiokafka's ClusterMetadata: a topic's partitions."""

    def __init__(self, partitions: dict[str, int]) -> None:
        self.partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        count = self.partitions.get(topic)
        return set(range(count)) if count is not None else None


def _wire(metadata: ConsumerProtocolMemberMetadata) -> Any:
    """A member's metadata as the leader receives it: encoded by the member, decoded by the leader."""
    return ConsumerProtocol.METADATA.decode(metadata.encode())


def test_member_url_round_trips_and_foreign_user_data_is_no_url() -> None:
    """A worker's URL survives its metadata's user_data; empty, non-JSON or another format's user_data is no URL."""
    assert decode_member(encode_member(W1)) == W1
    for foreign in (None, b"", b"\x00\x01", b'{"url": "http://x"}', b'{"v": 2, "url": "http://x"}', b"[1]",
                    b'{"v": 1, "url": 5}'):
        assert decode_member(foreign) is None, foreign


def test_owner_map_names_each_partition_once_and_leaves_out_members_without_url() -> None:
    """The map lists each member's partitions under its URL, sorted; a member that gave no URL is left out."""
    owners = owner_map({"m1": [("in-a", [1, 0])], "m2": [("in-a", [2, 3])], "m3": [("in-a", [4])]},
                       {"m1": W1, "m2": W2, "m3": None})
    assert owners == {W1: {"in-a": [0, 1]}, W2: {"in-a": [2, 3]}}
    assert decode_owners(encode_owners(owners)) == {("in-a", 0): W1, ("in-a", 1): W1, ("in-a", 2): W2,
                                                    ("in-a", 3): W2}


def test_foreign_or_missing_assignment_user_data_is_an_empty_map() -> None:
    """An assignment by an assignor that sent no map (an older worker led the group) or an unknown format
    leaves the owners unknown rather than wrong."""
    for foreign in (None, b"", b"not json", b'{"v": 2, "owners": {}}', b'{"v": 1, "owners": []}'):
        assert decode_owners(foreign) == {}, foreign
    assert decode_owners(b'{"v": 1, "owners": {"http://x": {"t": [0, "1"]}, "http://y": 3}}') == {("t", 0): "http://x"}


def test_assignment_is_the_range_assignors_with_the_owner_map_for_every_member() -> None:
    """The leader assigns exactly as aiokafka's range assignor (a route's inputs co-partitioned), and every member
    receives, through the wire format, the URL of each partition's owner; each worker keeps it on assignment."""
    one, two = OwnerDirectory(W1), OwnerDirectory(W2)
    first, second = assignor_for(one), assignor_for(two)
    assert first.name == RangePartitionAssignor.name == "range"  # joins a group with plain range members
    topics = ["in-a", "in-b"]
    members = {"member-1": _wire(first.metadata(topics)), "member-2": _wire(second.metadata(topics))}
    cluster = Cluster({"in-a": 4, "in-b": 4})
    assigned = first.assign(cluster, members)
    plain = RangePartitionAssignor.assign(cluster, members)
    assert {m: a.partitions() for m, a in assigned.items()} == {m: a.partitions() for m, a in plain.items()}
    first.on_assignment(ConsumerProtocol.ASSIGNMENT.decode(assigned["member-1"].encode()))
    second.on_assignment(ConsumerProtocol.ASSIGNMENT.decode(assigned["member-2"].encode()))
    expected = {(tp.topic, tp.partition): W1 for tp in plain["member-1"].partitions()}
    expected.update({(tp.topic, tp.partition): W2 for tp in plain["member-2"].partitions()})
    assert one.owners == two.owners == expected
    assert {expected[("in-a", p)] for p in range(4)} == {W1, W2}


def test_partitions_of_a_member_without_url_have_no_owner(config: GuardConfig) -> None:
    """A member of an older release (plain range metadata, no URL) gets its partitions, but no worker forwards
    to it: its partitions have no known owner."""
    directory = OwnerDirectory(W1)
    ours = assignor_for(directory)
    members = {"a-new": _wire(ours.metadata(["in-a"])), "b-old": _wire(RangePartitionAssignor.metadata(["in-a"]))}
    assigned = ours.assign(Cluster({"in-a": 4}), members)
    ours.on_assignment(assigned["a-new"])
    assert [directory.owner(config.routes[0].inputs, p) for p in range(4)] == [W1, W1, None, None]


class Runtime:
    """What read_entity asks of the batched runtime: the state of a partition it owns and has restored."""

    def __init__(self, config: GuardConfig, parts: dict[tuple[str, int], PartitionState]) -> None:
        self.parts = parts
        self.route_of = {topic: route for route in config.routes for topic in route.inputs}

    def readable(self, key: tuple[str, int]) -> PartitionState | None:
        return self.parts.get(key)


def test_owner_reads_stored_state_only(tmp_path: Path, config: GuardConfig) -> None:
    """The owner answers from what is stored: a pending write of a batch in flight (which may still abort) is not
    served until the batch is stored; an entity without state is here with no value."""
    route = config.routes[0]
    part = PartitionState(tmp_path, route, 2, {})
    try:
        directory = OwnerDirectory(W1)
        runtime: Any = Runtime(config, {("r", 2): part})
        part.readers[ENTITIES].put(b"acct-1", b"v1")
        part.store({ENTITIES: 0}, {})
        part.readers[ENTITIES].put(b"acct-1", b"v2 in flight")
        assert read_entity(runtime, directory, route, 2, b"acct-1").raw == b"v1"
        part.discard()  # the transaction aborted: v1 was right
        assert read_entity(runtime, directory, route, 2, b"acct-1").raw == b"v1"
        part.readers[ENTITIES].put(b"acct-1", b"v2")
        part.store({ENTITIES: 1}, {})
        found = read_entity(runtime, directory, route, 2, b"acct-1")
        assert (found.where, found.raw) == ("here", b"v2")
        found = read_entity(runtime, directory, route, 2, b"acct-9")
        assert (found.where, found.raw) == ("here", None)
    finally:
        part.close()


def test_a_partition_not_readable_here_is_forwarded_or_unavailable(config: GuardConfig) -> None:
    """Not readable here: another worker's partition names that worker; this worker's own (being restored or
    moved) or one nobody is known to own is unavailable, with the reason."""
    route = config.routes[0]
    directory = OwnerDirectory(W1)
    directory.update({("in-a", 0): W1, ("in-b", 0): W1, ("in-a", 1): W2, ("in-b", 1): W2})
    runtime: Any = Runtime(config, {})
    elsewhere = read_entity(runtime, directory, route, 1, b"e")
    assert (elsewhere.where, elsewhere.owner) == ("elsewhere", W2)
    restoring = read_entity(runtime, directory, route, 0, b"e")
    assert restoring.where == "unavailable" and "being restored" in restoring.detail
    unknown = read_entity(runtime, directory, route, 3, b"e")
    assert unknown.where == "unavailable" and "no worker is known" in unknown.detail


def test_runtime_reads_a_partition_only_once_restored_and_running(tmp_path: Path, config: GuardConfig) -> None:
    """BatchedRuntime.readable: a partition whose state is open but whose inputs do not run yet (being restored)
    or no longer run (being revoked) is not readable; once its inputs run, it is."""
    runtime = BatchedRuntime(
        app_id="app", bootstrap="127.0.0.1:9", config=config, guard=Guard(config), tabledir=tmp_path,
        store_options={}, guarantee="exactly_once", batch_max_records=10, batch_max_ms=10, session_timeout=10,
        fetch_min_bytes=1, fetch_max_wait_ms=10, producer={})
    part = PartitionState(tmp_path, config.routes[0], 1, {})
    try:
        assert runtime.readable(("r", 1)) is None
        runtime.parts[("r", 1)] = part  # assigned: opened, being restored
        assert runtime.readable(("r", 1)) is None
        runtime.positions[TopicPartition("in-b", 1)] = 0  # restored: its inputs run
        assert runtime.readable(("r", 1)) is part
        assert runtime.readable(("r", 2)) is None
        runtime.positions.clear()  # revoked: its inputs stopped, its state not yet closed
        assert runtime.readable(("r", 1)) is None
    finally:
        part.close()
