"""How far each audit source partition was drained into each join partition: the side reads behind the audits'
watermarks (docs/audits.md, Time).

`SourceDrains` builds, for every partition of every audit rule's verified topics, the chain of stages its records
pass on their way to the rule's join (byzguard/frontier.py) and follows it from the worker group's committed
offsets against the partitions' end offsets: a side consumer and an admin client, never the loop's consumer, so
the answer holds whichever worker owns each stage, and never per event: one round of reads every `interval`
seconds, in a task beside the loop. The join stage (app/runtime/audits.py) gives its partitions' watermarks what
it found (`through`) on the loop's idle step.
When the broker does not answer, the marks stay where they were and the watermarks hold: windows then close
late, never early, and the lag gauge and a warning say so.

End offsets are high watermarks (read_uncommitted), not last stable offsets: a record behind a transaction
still open (an upstream producer's, or one a stage cannot commit) is not drained until that transaction ends, so
it holds its source instead of hiding behind the open transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from app.sidereads import started_side_consumer, topic_partitions
from byzguard.audit import AuditRule, Source
from byzguard.config import GuardConfig, Partitioning
from byzguard.frontier import TP, Frontier
from topics import route_repartition_topic_name
from topics.audit import repartition_topic_name

log = logging.getLogger(__name__)

#: The longest a round of reads may take before it counts as failed.
READ_TIMEOUT = 30.0


def drain_interval(rules: Iterable[AuditRule]) -> float:
    """How often the drains are read: the shortest tick interval of the rules, at most 5 s."""
    return min((min(5.0, rule.tick_interval) for rule in rules), default=5.0)


def chains(app_id: str, config: GuardConfig, partitions: dict[str, list[int]]) -> dict[TP, tuple[frozenset[TP], ...]]:
    """Per partition of the audits' verified topics (`partitions`: the partitions of each topic, as the broker
    has them), the topic partitions of each stage its records pass before they are joined: a repartitioning
    route's inputs (every partition), the verify stage's input of that partition number, the verified partition
    (the audit's forward stage), the partitions of each rule's repartition topic that read the topic."""
    out: dict[TP, tuple[frozenset[TP], ...]] = {}
    verified = dict.fromkeys(t for rule in config.audits for t in rule.topics)
    for topic in verified:
        routes = [r for r in config.routes if r.verified_topic == topic]
        joins = frozenset((repartition_topic_name(app_id, rule), p) for rule in config.audits
                          if topic in rule.topics for p in range(rule.partitions))
        for partition in partitions.get(topic, ()):
            first: set[TP] = set()
            verify: set[TP] = set()
            for route in routes:
                if route.partitioning is Partitioning.REPARTITION:
                    first.update((t, p) for t in route.inputs for p in partitions.get(t, ()))
                    verify.add((route_repartition_topic_name(app_id, route), partition))
                else:
                    verify.update((t, partition) for t in route.inputs)
            out[(topic, partition)] = (frozenset(first), frozenset(verify), frozenset({(topic, partition)}), joins)
    return out


class SourceDrains:
    """The frontier of every audit source partition, read in a task of its own (see the module doc)."""

    def __init__(self, app_id: str, config: GuardConfig, bootstrap: str, group: str) -> None:
        self.app_id = app_id
        self.config = config
        self.bootstrap = bootstrap
        self.group = group
        self.interval = drain_interval(config.audits)
        #: Per rule, every source partition of its verified topics (empty until the partitions were looked up).
        self.sources: dict[str, tuple[Source, ...]] = {}
        self.frontier: Frontier | None = None
        #: Whether the last round of reads failed (the watermarks hold meanwhile).
        self.failing = False
        self._task: asyncio.Task[None] | None = None
        #: Set by `stop`: Python 3.11's `asyncio.wait_for` swallows a cancellation that meets the end of what it
        #: awaits (it returns that result instead), so the loop also ends on this flag.
        self._stopping = False
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None

    def through(self, source: Source, join: TopicPartition) -> float | None:
        """The wall time up to which `source` was drained into the join partition `join` (None: not known)."""
        if self.frontier is None:
            return None
        return self.frontier.through.get((source, (join.topic, join.partition)))

    def start(self) -> None:
        """Start reading, every `interval` seconds."""
        if self.config.audits and self._task is None:
            self._stopping = False
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop reading and close the clients."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._close()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self.refresh(), READ_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker out of reach, a topic not there yet: the watermarks hold
                if not self.failing:
                    log.warning("audits: the source partitions' progress cannot be read (%r); every audit window "
                                "stays open until it can", exc)
                self.failing = True
                await self._close()  # connect again on the next round
            else:
                if self.failing:
                    log.info("audits: the source partitions' progress is read again")
                self.failing = False
            await asyncio.sleep(self.interval)

    async def refresh(self) -> None:
        """One round of reads: a new mark on every source, then each level's end and committed offsets."""
        consumer, admin = await self._clients()
        if self.frontier is None:
            await self._look_up(consumer)
        frontier = self.frontier
        assert frontier is not None
        frontier.begin(time.time())
        for level in range(frontier.depth):
            wanted = sorted(frontier.wanted(level))
            tps = [TopicPartition(t, p) for t, p in wanted]
            ends = await consumer.end_offsets(tps) if tps else {}
            frontier.ends(level, {(tp.topic, tp.partition): offset for tp, offset in ends.items()})
            committed = await admin.list_consumer_group_offsets(self.group, partitions=tps) if tps else {}
            frontier.committed(level, {(tp.topic, tp.partition): meta.offset for tp, meta in committed.items()
                                       if meta.offset >= 0})

    async def _look_up(self, consumer: AIOKafkaConsumer) -> None:
        """The partitions of the verified topics and the route inputs feeding them (one metadata request)."""
        topics = {t for rule in self.config.audits for t in rule.topics}
        inputs = {t for r in self.config.routes if r.verified_topic in topics for t in r.inputs}
        found: dict[str, list[int]] = {}
        for tp in await topic_partitions(consumer, sorted(topics | inputs)):
            found.setdefault(tp.topic, []).append(tp.partition)
        missing = sorted(topics - set(found))
        if missing:
            raise LookupError(f"verified topic(s) {', '.join(missing)} not found")
        self.frontier = Frontier(chains(self.app_id, self.config, found))
        self.sources = {rule.name: tuple((t, p) for t in rule.topics for p in found[t]) for rule in self.config.audits}

    async def _clients(self) -> tuple[AIOKafkaConsumer, AIOKafkaAdminClient]:
        if self._consumer is None:
            self._consumer = await started_side_consumer(self.bootstrap, client_id=f"{self.app_id}-audit-drains",
                                                         isolation_level="read_uncommitted")
        if self._admin is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=f"{self.app_id}-audit-drains")
            await admin.start()
            self._admin = admin
        return self._consumer, self._admin

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        admin, self._admin = self._admin, None
        with contextlib.suppress(Exception):
            if consumer is not None:
                await consumer.stop()
        with contextlib.suppress(Exception):
            if admin is not None:
                await admin.close()

