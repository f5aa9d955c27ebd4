"""Which worker owns which route partition of the batched runtime, and an entity's state on the worker that owns it.

The last-known-good view (app/entities.py) and the review page (app/review/web.py) answer for any entity on any
worker: the owner of the entity's partition reads it, the others forward the request there. faust's table metadata
does not know (the batched runtime has its own consumer group, `<app_id>-verify`), so the runtime says who owns
what itself, through aiokafka's public assignor API:

- every worker's member metadata carries its web URL in `user_data` (`encode_member`);
- the group's leader assigns as aiokafka's range assignor does (a route's inputs stay co-partitioned) and gives
  every member the map of every input partition to the URL of the worker it went to, in the assignment's
  `user_data` (`encode_owners`);
- each worker keeps the map of the generation it joined (`OwnerDirectory`), updated in `on_assignment` (aiokafka
  calls it before the runtime's rebalance listener): no request to the broker per lookup.

The assignor keeps the range assignor's protocol name ("range"): a worker without it (an older release) joins
the same group, and whichever is the leader, the partitions are assigned as before; only the map may then be
empty or lack that worker's partitions, and a request for them answers 503 instead of being forwarded.

An entity's state is read by the worker that owns its partition from RocksDB only (`read_entity`): what the
batched runtime has stored, never the pending writes of a batch in flight. Under exactly_once those may still
abort (the transaction fails and the writes are discarded); under at_least_once they belong to a batch whose
outputs are not delivered yet: had the worker crashed then, the view would have served a value whose verified
event was never forwarded. A batch is stored within milliseconds of its processing (`batch_max_ms` plus its
deliveries), which is all the view lags behind. While a partition is assigned but not restored yet (its database
is being brought to its changelog's end) or is moving, nothing is read from it: the answer is 503 with
Retry-After.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import orjson
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

from byzguard.config import Route
from byzguard.guard import ENTITIES

if TYPE_CHECKING:
    from app.runtime.loop import BatchedRuntime

log = logging.getLogger(__name__)

#: The version of the user_data this module writes; data of another version is not read (an empty map).
FORMAT = 1


def encode_member(url: str) -> bytes:
    """A worker's member metadata user_data: its web URL."""
    return orjson.dumps({"v": FORMAT, "url": url})


def decode_member(data: bytes | None) -> str | None:
    """The web URL in a member's metadata user_data (None: none, or not this module's format)."""
    if not data:
        return None
    try:
        found = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(found, dict) or found.get("v") != FORMAT or not isinstance(found.get("url"), str):
        return None
    url: str = found["url"]
    return url


def owner_map(assignments: Mapping[str, Iterable[tuple[str, Iterable[int]]]],
              urls: Mapping[str, str | None]) -> dict[str, dict[str, list[int]]]:
    """URL -> topic -> partitions of an assignment (member id -> [(topic, partitions)]) for the members whose URL
    is known (`urls`: member id -> URL); a member without one is left out, and so are its partitions."""
    owners: dict[str, dict[str, list[int]]] = {}
    for member, topics in assignments.items():
        url = urls.get(member)
        if url is None:
            continue
        mine = owners.setdefault(url, {})
        for topic, partitions in topics:
            mine.setdefault(topic, []).extend(partitions)
    for mine in owners.values():
        for partitions in mine.values():
            partitions.sort()
    return owners


def encode_owners(owners: Mapping[str, Mapping[str, list[int]]]) -> bytes:
    """An assignment's user_data: the owner map (URL -> topic -> partitions) every member receives."""
    return orjson.dumps({"v": FORMAT, "owners": owners}, option=orjson.OPT_SORT_KEYS)


def decode_owners(data: bytes | None) -> dict[tuple[str, int], str]:
    """(topic, partition) -> URL of an assignment's user_data (empty: none, or not this module's format)."""
    if not data:
        return {}
    try:
        found = orjson.loads(data)
    except orjson.JSONDecodeError:
        log.warning("batched runtime: an assignment's owner map is not JSON; owners unknown until the next one")
        return {}
    if not isinstance(found, dict) or found.get("v") != FORMAT or not isinstance(found.get("owners"), dict):
        return {}
    by_partition: dict[tuple[str, int], str] = {}
    for url, topics in found["owners"].items():
        if not isinstance(topics, dict):
            continue
        for topic, partitions in topics.items():
            if isinstance(partitions, list):
                by_partition.update({(topic, p): url for p in partitions if isinstance(p, int)})
    return by_partition


class OwnerDirectory:
    """This worker's web URL and, as of the generation it joined last, the URL of every input partition's owner."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.owners: dict[tuple[str, int], str] = {}

    def update(self, owners: dict[tuple[str, int], str]) -> None:
        self.owners = owners

    def owner(self, topics: Iterable[str], partition: int) -> str | None:
        """The URL of the worker that owns `partition` of co-partitioned `topics` (a route's), None: unknown."""
        for topic in topics:
            url = self.owners.get((topic, partition))
            if url is not None:
                return url
        return None


class OwnersAssignor(RangePartitionAssignor):  # type: ignore[misc]  # aiokafka ships no type information
    """aiokafka's range assignor whose member metadata carries the worker's URL and whose assignments carry the
    owner map to every member (the module doc). Its methods are classmethods, as aiokafka's assignors' are: a
    worker uses its own subclass (`assignor_for`), which holds the worker's OwnerDirectory."""

    directory: ClassVar[OwnerDirectory]

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(cls.version, list(topics), encode_member(cls.directory.url))

    @classmethod
    def assign(cls, cluster: Any, members: Mapping[str, Any]) -> dict[str, ConsumerProtocolMemberAssignment]:
        assigned: dict[str, Any] = super().assign(cluster, members)
        urls = {member: decode_member(metadata.user_data) for member, metadata in members.items()}
        data = encode_owners(owner_map({m: a.assignment for m, a in assigned.items()}, urls))
        return {member: ConsumerProtocolMemberAssignment(a.version, a.assignment, data)
                for member, a in assigned.items()}

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        cls.directory.update(decode_owners(assignment.user_data))


def assignor_for(directory: OwnerDirectory) -> type[OwnersAssignor]:
    """The assignor of one worker (its `partition_assignment_strategy`), keeping the owners in `directory`."""
    return type("OwnersAssignor", (OwnersAssignor,), {"directory": directory})


@dataclass(frozen=True)
class Located:
    """Where an entity's state is: read here (`raw`, None: no state), held by another worker (`owner`), or
    unavailable now (`detail` says why; answer 503 with Retry-After)."""

    where: Literal["here", "elsewhere", "unavailable"]
    raw: bytes | None = None
    owner: str | None = None
    detail: str = ""


def read_entity(runtime: BatchedRuntime, directory: OwnerDirectory, route: Route, partition: int,
                entity: bytes) -> Located:
    """An entity's stored state where this worker owns and has restored its partition; else its owner, or why
    nobody can answer now (the module doc says why only stored state is read)."""
    part = runtime.readable((route.name, partition))
    if part is not None:
        raw: bytes | None = part.dbs[ENTITIES].get(entity)
        return Located("here", raw=raw)
    # The topics the route's state follows: its inputs, or its repartition topic where it has one.
    owner = directory.owner([t for t, r in runtime.route_of.items() if r.name == route.name], partition)
    if owner is None:
        return Located("unavailable", detail=f"no worker is known to own partition {partition} yet")
    if owner == directory.url:
        return Located("unavailable", detail=f"partition {partition} is being restored or moved on this worker")
    return Located("elsewhere", owner=owner)
