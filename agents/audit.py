"""The continuous cross-stream audits: two agents per rule, joined through a repartition topic.

    <left/right verified topics> --audit_forward--> <app_id>-audit-<rule>-repartition --audit_join--> discrepancies
        keyed by entity id          (join key, observation)  keyed by join key        join table     (audit topic)

The verified topics are keyed by entity id, so the two sides of one join key (an order and its payment) sit
in different partitions. `audit_forward` re-keys each relevant record by its join key; `audit_join` then
owns every join key of its partition, with the pending observations in a table co-partitioned with it.
Windows close inside the stream (table writes and sends belong to a partition's transaction): a timer sends
a tick record to every partition of the repartition topic this worker owns, and the agent expires the
partition's pending entries when the tick arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import faust
from faust.types import TableT
from mode.supervisors import CrashingSupervisor

from app import eos, metrics
from byzguard.audit import AgreementWindow, AuditRule, Check, Observation, observation_of
from byzguard.config import GuardConfig
from byzguard.envelope import decode
from byzguard.partitioner import partition_for
from byzguard.processor import PENDING, AuditJoinProcessor, AuditOutput, TableState
from byzguard.routing import H_VERDICT
from tables.audit import declare_audit_table
from topics.audit import AuditTopics, declare_audit_topics

log = logging.getLogger(__name__)

H_AUDIT_RULE = "byzguard_audit_rule"
H_AUDIT_KIND = "byzguard_audit_kind"
TICK_KEY = b"\x00tick"


def header(headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None, name: str) -> bytes | None:
    """The last value of a record header, or None."""
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    found = None
    for key, value in items:
        if key == name:
            found = value
    return found


class CheckRecorder:
    """Counts a rule's checks in the metrics and keeps its rolling agreement rate."""

    def __init__(self, rule: AuditRule) -> None:
        self.rule = rule
        self.window = AgreementWindow()
        self.checks = metrics.AUDIT_CHECKS.labels(rule.name)
        self.agreement = metrics.AUDIT_AGREEMENT.labels(rule.name)

    def record(self, checks: Iterable[Check], wall: float) -> None:
        for check in checks:
            self.checks.inc()
            self.window.record(check.passed, wall)
            if check.discrepancy is not None:
                metrics.AUDIT_DISCREPANCIES.labels(self.rule.name, check.discrepancy.kind.value).inc()
        self.refresh(wall)

    def refresh(self, wall: float) -> None:
        rate = self.window.rate(wall)
        if rate is not None:
            self.agreement.set(rate)


def attach_audit_agents(app: faust.App, config: GuardConfig, rule: AuditRule, topics: AuditTopics,
                        table: TableT[bytes, bytes]) -> tuple[Any, Any]:
    """Register a rule's forward and join agents (and its expiry ticks) on `app`."""
    routes = {r.verified_topic: r for r in config.routes}
    repartition = topics.repartition_topic
    repartition_name = repartition.get_topic_name()
    discrepancies = topics.discrepancies_topic
    recorder = CheckRecorder(rule)

    async def send_discrepancies(checks: Sequence[Check], wall: float) -> None:
        recorder.record(checks, wall)
        for check in checks:
            disc = check.discrepancy
            if disc is not None:
                await discrepancies.send(key=disc.key.encode(), value=disc.to_bytes(),
                                         headers=[(H_AUDIT_RULE, rule.name.encode()),
                                                  (H_AUDIT_KIND, disc.kind.value.encode())])

    async def audit_forward(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            # An event's sends and its ack happen with no commit in between (app/eos.py).
            async with eos.processing(app, event):
                await forward_one(event.message)
            yield None

    async def forward_one(msg: Any) -> None:
        route = routes.get(msg.topic)
        # Suspect records of fail-open routes are on the verified topic too, but they were not verified.
        if route is None or header(msg.headers, H_VERDICT) == b"suspect":
            return
        env = decode(msg.key, msg.value, msg.headers or (), default_type=route.default_type)
        if isinstance(env, tuple):
            return
        for side in rule.sides_of(msg.topic, env.type):
            item = observation_of(rule, side, env.data(), subject=env.subject, event_id=env.id, at=msg.timestamp)
            if isinstance(item, Observation):
                key = item.key.encode()
                await repartition.send(key=key, value=item.to_bytes(), partition=partition_for(key, rule.partitions))
            elif item is not None:
                await send_discrepancies([item], time.time())

    # The join itself is the core's processor (byzguard/processor.py), one per partition: it keeps the
    # partition's stream clock.
    joins: dict[int, tuple[AuditJoinProcessor, dict[str, TableState]]] = {}

    def join_of(partition: int) -> tuple[AuditJoinProcessor, dict[str, TableState]]:
        found = joins.get(partition)
        if found is None:
            found = joins[partition] = (AuditJoinProcessor(rule), {PENDING: PartitionTable(table, partition, rule)})
        return found

    async def report(out: AuditOutput, wall: float) -> None:
        for key, why in out.unreadable:
            # A state this version cannot read must not stop every audit (the agent would crash on every
            # restart): its pending observations are given up, loudly.
            log.error("audit %s: join state of key %r dropped: %s", rule.name, key, why)
        await send_discrepancies(out.checks, wall)

    async def audit_join(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            async with eos.processing(app, event):
                msg = event.message
                if not msg.value:
                    # Ticks queued while the worker was away are skipped: one fresh tick does their work.
                    if msg.timestamp >= time.time() - 2 * rule.tick_interval:
                        await close_windows(msg.partition)
                elif msg.key is not None:
                    await join_one(msg.partition, Observation.from_bytes(msg.value))
            yield None

    async def join_one(partition: int, obs: Observation) -> None:
        wall = time.time()
        processor, state = join_of(partition)
        await report(processor.process(obs, state, wall), wall)

    async def close_windows(partition: int) -> None:
        """A tick: report and forget what waited in this partition past its window (and the grace)."""
        wall = time.time()
        processor, state = join_of(partition)
        await report(processor.punctuate(state, wall), wall)
        recorder.refresh(wall)

    @app.timer(interval=rule.tick_interval, name=f"audit_ticks-{rule.name}")  # type: ignore[untyped-decorator]  # faust's App.timer is untyped
    async def tick_audit_windows() -> None:
        # Table writes and sends belong to a partition's transaction, so the timer only asks each owned
        # partition to close its windows; the join agent does it in the stream. The tick itself goes through
        # the plain producer: in a partition's transaction it would wait for a commit that only the
        # agent reading past it can cause, and read_committed readers would never see it.
        producer = app.producer
        await producer.maybe_start()
        for tp in app.assignor.assigned_actives():
            if tp.topic == repartition_name:
                await producer.send(repartition_name, TICK_KEY, b"", tp.partition, None, None)

    # A crashing audit agent stops the worker loudly, as the verify agent does.
    forward = app.agent(topics.sources_topic, name=f"audit_forward-{rule.name}",
                        supervisor_strategy=CrashingSupervisor)(audit_forward)
    join = app.agent(repartition, name=f"audit_join-{rule.name}", supervisor_strategy=CrashingSupervisor)(audit_join)
    return forward, join


class PartitionTable:
    """The join table of one partition as the core's processor sees it (faust's table spans every partition this
    worker owns; only this partition's keys may be read for a punctuation and written from its stream)."""

    __slots__ = ("partition", "rule", "table")

    def __init__(self, table: TableT[bytes, bytes], partition: int, rule: AuditRule) -> None:
        self.table = table
        self.partition = partition
        self.rule = rule

    def get(self, key: bytes) -> bytes | None:
        """The join state bytes of `key`, or None."""
        value: bytes | None = self.table.get(key)
        return value

    def put(self, key: bytes, value: bytes) -> None:
        """Write a join state (a changelog record)."""
        self.table[key] = value

    def delete(self, key: bytes) -> None:
        """Remove a join state that is empty now."""
        if key in self.table:
            del self.table[key]

    def items(self) -> list[tuple[bytes, bytes]]:
        """The join states of this partition."""
        return [(key, raw) for key, raw in list(self.table.items())
                if partition_for(key, self.rule.partitions) == self.partition]


def attach_audits(built: Any, config: GuardConfig) -> None:
    """Declare every audit rule's topics, join table and agents on a built worker (app.worker.GuardApp)."""
    for rule in config.audits:
        topics = declare_audit_topics(built.app, rule)
        table = declare_audit_table(built.app, rule, built.store_options)
        built.agents[f"audit:{rule.name}"] = attach_audit_agents(built.app, config, rule, topics, table)
