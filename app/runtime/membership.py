"""A worker restarted on its data dir takes its partitions back at once, not after the dead one's session timeout.

A SIGKILLed worker never leaves its consumer group: the group coordinator keeps the dead member, and its
partitions with it, until no heartbeat came for `session_timeout` (10 s by default). A worker restarted at once
on the same data dir would wait that long for its own partitions.

So the batched runtime's consumer, and faust's (group `<app_id>`, which reads none of the routes' topics), carry a
client id that is stable per data dir (`byzguard-<id>`, the id kept in `<data dir>/byzguard-instance`). At
start, before they join, the worker looks up the members of both groups (DescribeGroups) with that client id:
each is a previous process on this data dir that did not leave (a clean stop leaves the group itself), and it
removes them (LeaveGroup with their member id, what a clean stop sends). The coordinator then rebalances at
once. The removal is sent once the new consumer's own join is pending (the group is rebalancing), so the group
is never empty in between and the broker's `group.initial.rebalance.delay.ms` (3 s by default; 0 in
byzguard's compose file and local broker) does not apply.

Static membership (`group_instance_id`, KIP-345) would give the same, but aiokafka 0.14 does not leave the group
on close when it is set (it has no LeaveGroup v3 with instance ids), so a clean stop would hold its partitions
for the whole session timeout: scaling in would stall.

A zombie (a previous process that is in fact still alive, e.g. paused) that is removed rejoins as a new member,
as after an expired session: its commits fail, and under exactly_once its transactional producers are fenced by
the new owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

from aiokafka.client import AIOKafkaClient, ConnectionGroup, CoordinationType
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import DescribeGroupsRequest
from aiokafka.protocol.group import LeaveGroupRequest

log = logging.getLogger(__name__)

#: The file in the data dir that holds the worker's instance id.
INSTANCE_FILE = "byzguard-instance"
#: How long the removal waits for the new consumer's join to be pending before it removes the dead members
#: anyway.
JOIN_WAIT = 3.0
#: The same for faust's group: its consumer joins only after the batched runtime and faust's other services
#: started.
FAUST_JOIN_WAIT = 20.0


def client_id(data_dir: Path) -> str:
    """The batched runtime's consumer client id on `data_dir`: the same for every process on it."""
    path = data_dir / INSTANCE_FILE
    try:
        instance = path.read_text().strip()
    except FileNotFoundError:
        instance = ""
    if not instance:
        instance = uuid.uuid4().hex[:16]
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{instance}\n")
    return f"byzguard-{instance}"


async def _describe(client: AIOKafkaClient, node: int, group: str) -> tuple[str, list[tuple[str, str]]]:
    """The group's state and its members as (member id, client id)."""
    response = await client.send(node, DescribeGroupsRequest([group]), group=ConnectionGroup.COORDINATION)
    found = response.groups[0]
    error, state, members = found[0], found[2], found[5]
    if error:
        raise for_code(error)()
    return state, [(m[0], m[1]) for m in members]


class Takeover:
    """The members of `group` with client id `client` found before this process joins (previous processes on
    this data dir that never left); `remove` removes them once this process's join is pending. Best effort: a
    failure is logged, and the dead members then go after their session timeout as before."""

    def __init__(self, bootstrap: str, group: str, client: str, *, join_wait: float = JOIN_WAIT) -> None:
        self.group = group
        self.join_wait = join_wait
        self.client = client
        self.kafka = AIOKafkaClient(bootstrap_servers=bootstrap, client_id=f"{client}-takeover")
        self.node: int | None = None
        self.previous: list[str] = []

    async def find(self) -> list[str]:
        """Look up the previous processes' members (call before this process's consumer subscribes)."""
        try:
            await self.kafka.bootstrap()
            self.node = await self.kafka.coordinator_lookup(CoordinationType.GROUP, self.group)
            _, members = await _describe(self.kafka, self.node, self.group)
        except (KafkaError, OSError) as exc:
            log.warning("group %s: could not look for members a previous process on this data dir left behind "
                        "(%r); if there are any, they go after their session timeout", self.group, exc)
            return []
        self.previous = sorted(member for member, cid in members if cid == self.client)
        return self.previous

    async def remove(self) -> list[str]:
        """Once a rebalance is pending (this process's join) or after `join_wait` seconds, remove the members
        `find` found; returns those removed."""
        removed: list[str] = []
        try:
            if not self.previous or self.node is None:
                return []
            deadline = time.monotonic() + self.join_wait
            state = ""
            while state not in ("PreparingRebalance", "CompletingRebalance") and time.monotonic() < deadline:
                state, _ = await _describe(self.kafka, self.node, self.group)
                await asyncio.sleep(0.05)
            for member in self.previous:
                response = await self.kafka.send(self.node, LeaveGroupRequest(self.group, member),
                                                 group=ConnectionGroup.COORDINATION)
                if response.error_code:  # it left or expired meanwhile
                    log.info("group %s: member %s of a previous process on this data dir is gone already (%s)",
                             self.group, member, for_code(response.error_code).__name__)
                else:
                    removed.append(member)
            if removed:
                log.info("group %s: removed %d member(s) a previous process on this data dir left behind (%s): "
                         "its partitions are reassigned now, not after its session timeout", self.group,
                         len(removed), ", ".join(removed))
        except (KafkaError, OSError) as exc:
            log.warning("group %s: could not remove the members a previous process on this data dir left behind "
                        "(%r); they go after their session timeout", self.group, exc)
        return removed

    async def close(self) -> None:
        await self.kafka.close()

    async def run(self) -> list[str]:
        """`remove`, then `close`."""
        try:
            return await self.remove()
        finally:
            await self.close()
