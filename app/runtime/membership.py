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

A data dir that is wiped, or new (a container without a persistent volume), has lost that id. Such a worker still
recognises a previous process at its endpoint: a member of `<app_id>-verify` that connected from this process's
own address (the client host the broker reports, against the local address of a connection to the coordinator)
and carries this worker's web URL. No live process can serve that URL at that address while this one is about to:
before removing such a member the worker binds the URL's address and port once, and removes nothing if another
process serves them (its web server binds them only after the runtime started). The members of faust's group with
the client ids so found go too. A NAT between worker and broker makes the addresses differ: nothing matches.

A worker with a
name of its own (`BYZGUARD_WORKER_ID`: a StatefulSet pod name, a compose service with its replica number)
carries `byzguard-worker-<name>` instead, whatever its data dir: a restarted worker of that name recognises its
predecessor's members on a new data dir too. The name must be unique among the app's live workers. As a guard
against two live workers given one name, a member of `<app_id>-verify` with that client id is removed only when
its metadata carries this worker's own web URL (app/runtime/owners.py `encode_member`), which only one live
process can serve: if one carries another URL (another host or port), nothing is removed in either group, and
the log says so. (Two workers given one name *and* one URL, e.g. containers that all say
`http://127.0.0.1:6066`, are not told apart: the name's uniqueness is the operator's.)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from aiokafka.client import AIOKafkaClient, ConnectionGroup, CoordinationType
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import DescribeGroupsRequest
from aiokafka.protocol.group import LeaveGroupRequest

from app.runtime.owners import decode_member

log = logging.getLogger(__name__)

#: The file in the data dir that holds the worker's instance id.
INSTANCE_FILE = "byzguard-instance"
#: How long the removal waits for the new consumer's join to be pending before it removes the dead members
#: anyway.
JOIN_WAIT = 3.0
#: The same for faust's group: its consumer joins only after the batched runtime and faust's other services
#: started.
FAUST_JOIN_WAIT = 20.0


#: The client id prefix of a worker named by BYZGUARD_WORKER_ID (a data dir's instance id has none of its own).
WORKER_PREFIX = "byzguard-worker-"


def client_id(data_dir: Path, worker_id: str | None = None) -> str:
    """The batched runtime's consumer client id: the worker's name (`worker_id`) if it has one, else the same for
    every process on `data_dir`."""
    if worker_id:
        return f"{WORKER_PREFIX}{worker_id}"
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


async def _describe(client: AIOKafkaClient, node: int,
                    group: str) -> tuple[str, list[tuple[str, str, str | None, bytes]]]:
    """The group's state and its members as (member id, client id, the address the broker saw it connect from,
    member metadata)."""
    response = await client.send(node, DescribeGroupsRequest([group]), group=ConnectionGroup.COORDINATION)
    found = response.groups[0]
    error, state, members = found[0], found[2], found[5]
    if error:
        raise for_code(error)()
    return state, [(m[0], m[1], address(m[2]), m[3]) for m in members]


def address(text: str) -> str | None:
    """An IP address in one form: a member's client host as the broker reports it (`/10.0.0.5`, `host/10.0.0.5`) or
    a socket's address (an IPv4-mapped IPv6 one as IPv4); None when `text` is none."""
    try:
        ip = ipaddress.ip_address(text.rpartition("/")[2].partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


async def local_address(client: AIOKafkaClient, node: int) -> str | None:
    """The address this process connects to broker `node` from (what the broker reports as the client host of a
    member that connected from here, unless a NAT stands between); None when it cannot connect."""
    broker = client.cluster.broker_metadata(node)
    if broker is None:
        return None
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(broker.host, broker.port), 5.0)
    except (OSError, TimeoutError):
        return None
    try:
        return address(str(writer.get_extra_info("sockname")[0]))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def member_url(metadata: bytes) -> str | None:
    """The web URL a member of `<app_id>-verify` carries in its metadata (None: none, or not readable)."""
    try:
        return decode_member(ConsumerProtocolMemberMetadata.decode(metadata).user_data)
    except Exception:  # another assignor's or a broken metadata: no URL
        return None


def serving(url: str) -> bool | None:
    """Whether a process on this host serves `url` now (its address and port cannot be bound, as the worker's web
    server binds them); None: cannot tell (not an address of this host)."""
    parts = urlsplit(url)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(parts.hostname, parts.port, type=socket.SOCK_STREAM)[0]
    except (OSError, ValueError, IndexError):
        return None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server: a TIME_WAIT is no server
        try:
            sock.bind(where)
        except OSError as exc:
            return True if exc.errno == errno.EADDRINUSE else None
    return False


class Takeover:
    """The members of `group` a previous process of this worker left behind (it never left), found before this
    process joins: those with client id `client` (its data dir's or its name's), and those of its endpoint (this
    process's address and web URL); `remove` removes them once this process's join is pending. Best effort: a
    failure is logged, and the dead members then go after their session timeout."""

    def __init__(self, bootstrap: str, group: str, client: str, *, join_wait: float = JOIN_WAIT,
                 url: str | None = None, named: bool = False) -> None:
        self.group = group
        self.join_wait = join_wait
        self.client = client
        #: This worker's web URL: a member of the same address with it is a previous process of this endpoint;
        #: `named`: a member with `client` (the worker's name) is a previous process only if it carries this URL.
        self.url = url
        self.named = named
        self.kafka = AIOKafkaClient(bootstrap_servers=bootstrap, client_id=f"{client}-takeover")
        self.node: int | None = None
        self.previous: list[str] = []
        #: Members with `client` at another URL: live workers given the same name; nothing is removed then.
        self.others: list[str] = []
        #: The address this process connects to the coordinator from (None: unknown, no endpoint match).
        self.address: str | None = None
        #: Client ids of previous processes of this endpoint: found by URL in `<app_id>-verify`, handed to the
        #: lookup in faust's group (whose members carry no URL).
        self.endpoint_clients: set[str] = set()

    async def find(self) -> list[str]:
        """Look up the previous processes' members (call before this process's consumer subscribes)."""
        try:
            await self.kafka.bootstrap()
            self.node = await self.kafka.coordinator_lookup(CoordinationType.GROUP, self.group)
            if self.url is not None:
                self.address = await local_address(self.kafka, self.node)
            _, members = await _describe(self.kafka, self.node, self.group)
        except (KafkaError, OSError) as exc:
            log.warning("group %s: could not look for members a previous process of this worker left behind "
                        "(%r); if there are any, they go after their session timeout", self.group, exc)
            return []
        mine = [(member, metadata) for member, cid, _, metadata in members if cid == self.client]
        if self.named and self.url is not None:
            self.others = sorted(member for member, metadata in mine if member_url(metadata) != self.url)
            if self.others:
                log.warning("group %s: %d member(s) with this worker's id %s serve another URL than %s (%s): "
                            "another live worker has this BYZGUARD_WORKER_ID; nothing is removed, and the worker "
                            "ids must be made unique", self.group, len(self.others), self.client, self.url,
                            ", ".join(self.others))
                self.previous = []
                return []
        # The same endpoint (a wiped or new data dir, no name): a member that connected from this process's address
        # and serves its URL is a previous process of this worker, as a live process cannot serve that URL there
        # while this one is about to. In faust's group (no URL in the metadata): the client ids found so.
        here = [(member, cid, metadata) for member, cid, host, metadata in members
                if cid != self.client and self.address is not None and host == self.address
                and (cid in self.endpoint_clients if self.url is None else member_url(metadata) == self.url)]
        if here and self.url is not None and serving(self.url) is not False:
            log.warning("group %s: member(s) %s connected from this worker's address %s, and %s cannot be bound here "
                        "(another process serves it): nothing of theirs is removed", self.group,
                        ", ".join(sorted(m for m, _, _ in here)), self.address, self.url)
            here = []
        if here:
            self.endpoint_clients = {cid for _, cid, _ in here}
            log.info("group %s: member(s) %s connected from this worker's address %s%s: a previous process of this "
                     "worker", self.group, ", ".join(sorted(m for m, _, _ in here)), self.address,
                     f" and serve its URL {self.url}" if self.url else "")
            mine += [(member, metadata) for member, _, metadata in here]
        self.previous = sorted(member for member, _ in mine)
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
                    log.info("group %s: member %s of a previous process of this worker is gone already (%s)",
                             self.group, member, for_code(response.error_code).__name__)
                else:
                    removed.append(member)
            if removed:
                log.info("group %s: removed %d member(s) a previous process of this worker left behind (%s): "
                         "its partitions are reassigned now, not after its session timeout", self.group,
                         len(removed), ", ".join(removed))
        except (KafkaError, OSError) as exc:
            log.warning("group %s: could not remove the members a previous process of this worker left behind "
                        "(%r); they go after their session timeout", self.group, exc)
        return removed

    async def close(self) -> None:
        await self.kafka.close()

    def forget(self) -> None:
        """Remove nothing (the other group's members with this client id are not all a previous process's)."""
        self.previous = []

    async def run(self) -> list[str]:
        """`remove`, then `close`."""
        try:
            return await self.remove()
        finally:
            await self.close()


async def find_previous(verify: Takeover, faust_group: Takeover) -> None:
    """Look up the members previous processes of this worker left in `<app_id>-verify` (`verify`, with the URL) and
    then in faust's group (the client ids found at this endpoint in the former); if another live worker has this
    worker's name, remove nothing in either."""
    await verify.find()
    faust_group.address, faust_group.endpoint_clients = verify.address, set(verify.endpoint_clients)
    if verify.others:
        faust_group.forget()
        return
    await faust_group.find()
