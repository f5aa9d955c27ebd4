"""byzguard_quarantine_backlog_records: quarantined records by review status, counted by the worker that owns them.

Each worker counts the quarantine partitions co-partitioned with the input partitions it owns, so the sum over
workers is the whole backlog (the dashboard and the ByzguardQuarantineBacklogGrowing alert sum by route). It
reads those partitions (read_committed, no consumer group) and the decisions topic, keeps per partition a
counter and the range of quarantine ids read, and one status per decided quarantine id, never the records:
`pending` is what was quarantined and not yet decided; approved, rejected, replayed and rechecked are the
decided ones. A quarantine id is `<input topic>-<partition>-<offset>`, and outputs keep their input's
partition, so a decision belongs to the owner of that partition.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from app import metrics
from app.sidereads import started_side_consumer, topic_partitions
from byzguard.config import GuardConfig
from byzguard.review import DecisionRecord, Status, status_of
from byzguard.routing import H_QUARANTINE_ID

log = logging.getLogger(__name__)

INTERVAL = 15.0
STATUSES = tuple(s.value for s in Status)


def split_quarantine_id(qid: str) -> tuple[str, int, int] | None:
    """`<topic>-<partition>-<offset>` -> (topic, partition, offset); None when it is not of that form."""
    topic, _, rest = qid.rpartition("-")
    topic, _, partition = topic.rpartition("-")
    if not topic or not partition.isdigit() or not rest.isdigit():
        return None
    return topic, int(partition), int(rest)


@dataclass
class PartitionCount:
    """What was read from one quarantine partition: how many records, and which quarantine ids they carry (per
    original input partition, the lowest and highest original offset: a quarantine id names those)."""

    records: int = 0
    spans: dict[tuple[str, int], list[int]] = field(default_factory=dict)


@dataclass
class BacklogCounts:
    """What one worker counts: records read per owned quarantine partition, and every decision's status."""

    #: quarantine topic -> route name
    routes: Mapping[str, str]
    #: (quarantine topic, partition) -> what was read from it
    read: dict[tuple[str, int], PartitionCount] = field(default_factory=dict)
    #: quarantine id -> its status (decided ones only: pending is what is left)
    decided: dict[str, Status] = field(default_factory=dict)

    def own(self, partitions: Collection[tuple[str, int]]) -> list[tuple[str, int]]:
        """Keep counting `partitions` only; return those that are new (to be read from their beginning)."""
        for gone in [tp for tp in self.read if tp not in partitions]:
            del self.read[gone]
        new = [tp for tp in partitions if tp not in self.read]
        for tp in new:
            self.read[tp] = PartitionCount()
        return new

    def add_record(self, topic: str, partition: int, quarantine_id: str | None) -> None:
        """Count one quarantined record (its `byzguard_quarantine_id`) read from an owned partition."""
        count = self.read.get((topic, partition))
        if count is None:
            return
        count.records += 1
        where = split_quarantine_id(quarantine_id) if quarantine_id else None
        if where is not None:
            original, offset = where[:2], where[2]
            span = count.spans.get(original)
            if span is None:
                count.spans[original] = [offset, offset]
            else:
                span[0], span[1] = min(span[0], offset), max(span[1], offset)

    def add_decision(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one decisions-topic record (the latest history of a quarantine id wins; tombstones undo)."""
        if key is None:
            return
        qid = key.decode("utf-8", "replace")
        if value is None:
            self.decided.pop(qid, None)
            return
        try:
            self.decided[qid] = status_of(DecisionRecord.from_bytes(value))
        except (ValueError, KeyError, TypeError):
            return

    def by_route(self) -> dict[str, dict[str, int]]:
        """route -> status -> records, over the owned partitions (every route and status present, 0 or more)."""
        out = {route: dict.fromkeys(STATUSES, 0) for route in sorted(set(self.routes.values()))}
        ours: dict[tuple[str, int], tuple[str, list[int]]] = {}
        for (topic, _), count in self.read.items():
            route = self.routes[topic]
            out[route][Status.PENDING.value] += count.records
            for original, span in count.spans.items():
                ours[original] = (route, span)
        for qid, status in self.decided.items():
            where = split_quarantine_id(qid)
            if where is None:
                continue
            found = ours.get(where[:2])
            if found is None or not found[1][0] <= where[2] <= found[1][1]:
                continue  # not ours, expired from the topic, or not read yet
            counts = out[found[0]]
            counts[Status.PENDING.value] -= 1
            counts[status.value] += 1
        return out


class QuarantineBacklog:
    """Follows the owned quarantine partitions and the decisions topic; publishes the backlog gauge."""

    def __init__(self, bootstrap: str, config: GuardConfig, decisions_topic: str) -> None:
        self.bootstrap = bootstrap
        self.decisions_topic = decisions_topic
        routes: dict[str, str] = {}
        for route in config.routes:
            routes.setdefault(route.quarantine_topic, route.name)
        self.inputs = {topic: route.quarantine_topic for route in config.routes for topic in route.inputs}
        self.counts = BacklogCounts(routes)
        self._consumer: AIOKafkaConsumer | None = None
        self._decisions: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}

    async def update(self, assigned: Iterable[Any]) -> None:
        """Read what is new in the quarantine partitions of the `assigned` input partitions; set the gauge."""
        owned = {(self.inputs[tp.topic], tp.partition) for tp in assigned if tp.topic in self.inputs}
        try:
            consumer = await self._started()
            if not self._decisions:  # created by the first review action; until then nothing is decided
                self._decisions = await topic_partitions(consumer, [self.decisions_topic])
            new = self.counts.own(owned)
            for topic, partition in new:
                self._positions.pop(TopicPartition(topic, partition), None)
            tps = [TopicPartition(t, p) for t, p in sorted(owned)] + self._decisions
            if set(tps) != set(consumer.assignment()):
                consumer.assign(tps)  # a new assignment forgets positions: seek each back to where it was
                for tp in tps:
                    if tp in self._positions:
                        consumer.seek(tp, self._positions[tp])
                    else:
                        await consumer.seek_to_beginning(tp)
            ends = await consumer.end_offsets(tps) if tps else {}
            remaining = {tp for tp, end in ends.items() if await consumer.position(tp) < end}
            for _ in range(200):  # bounded: what is left is read on the next update
                if not remaining:
                    break
                batch = await consumer.getmany(*remaining, timeout_ms=200, max_records=5000)
                for tp, records in batch.items():
                    for rec in records:
                        if tp.topic == self.decisions_topic:
                            self.counts.add_decision(rec.key, rec.value)
                        else:
                            qid = next((v for k, v in rec.headers or () if k == H_QUARANTINE_ID), None)
                            self.counts.add_record(tp.topic, tp.partition,
                                                   qid.decode("utf-8", "replace") if qid else None)
                for tp in list(remaining):
                    self._positions[tp] = position = await consumer.position(tp)
                    if position >= ends[tp]:
                        remaining.discard(tp)
        except KafkaError as exc:  # the broker is away: keep the last values, try again on the next update
            log.debug("quarantine backlog not updated: %s", exc)
            return
        except Exception as exc:  # a gauge must never take the worker down: start over on the next update
            log.warning("quarantine backlog not updated (%r); reading its partitions again", exc)
            self.counts = BacklogCounts(self.counts.routes)
            self._positions.clear()
            await self.stop()
            return
        for route, statuses in self.counts.by_route().items():
            for status, value in statuses.items():
                metrics.QUARANTINE_BACKLOG.labels(route, status).set(value)

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            self._consumer = await started_side_consumer(self.bootstrap, client_id="byzguard-backlog")
        return self._consumer

    async def stop(self) -> None:
        """Stop reading."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()
