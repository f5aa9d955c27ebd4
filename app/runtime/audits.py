"""The cross-stream audits on the batched runtime (docs/audits.md): per rule a forward stage and a join stage.

    <left/right verified topics> --AuditForward--> <app_id>-audit-<rule>-repartition --AuditJoins--> discrepancies
        keyed by entity id         (join key, observation)  keyed by join key     join table      (audit topic)

`AuditForward` is a forward stage (app/runtime/stages.py): each verified record of a rule's sides becomes an
observation timed by its event's time (byzguard.audit `event_time`) and keyed by its join key, at the join key's
murmur2 partition of the repartition topic, with the verified record's coordinates in a header
(`byzguard_repartitioned_from`, as a route's repartition copies), so the join skips an observation at_least_once
delivers again (byzguard/processor.py `AuditJoinProcessor`) and knows its source partition; a subject record
without a usable join key is a `missing` discrepancy at once. `AuditJoins` runs the core's `AuditJoinProcessor`
(byzguard/processor.py) per partition of the repartition topic over the partition's join table: faust's RocksDB
layout (`<tabledir>/audit-<rule>-pending_by_key-<partition>.db`) and changelog
(`<app_id>-audit-<rule>-pending_by_key-changelog`), so a data dir of the faust runtime is taken over. Windows
close by the partition's watermark (byzguard.audit `Watermark`: the least progress over the source partitions
feeding it, kept in its table; a quiet source's progress follows how far it was drained, as the side reads of
app/runtime/watermarks.py find on each idle step) as a punctuation: after a batch once `tick_interval` passed
since the partition's last one, and on the loop's idle timer, inside the partition's transaction; no tick records.
Tick records the faust runtime left on the repartition topic (empty values) are skipped.

Per batch of a join partition, as the verify stage does (app/runtime/loop.py): exactly_once, one transaction
(transactional id `<app_id>-audit-<rule>-<partition>`) holds the discrepancies, the changelog records and the
input offsets, and RocksDB is written once it committed; at_least_once, the discrepancies are delivered, then
the changelog records, then RocksDB gets the state with the next input offset, then the loop commits.
Discrepancies carry the same keys, values and headers (byzguard_audit_rule / byzguard_audit_kind) as on the
faust runtime, and the rule's CheckRecorder keeps the audit metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from agents.audit import H_AUDIT_KIND, H_AUDIT_RULE, CheckRecorder, header
from app import metrics
from app.runtime.batches import RecordBatches
from app.runtime.stages import StageContext, commit, partition_counts
from app.runtime.state import PartitionState, restore
from app.runtime.watermarks import SourceDrains
from byzguard.audit import AuditRule, Check, Observation, event_time, observation_of
from byzguard.config import GuardConfig
from byzguard.envelope import decode
from byzguard.partitioner import partition_for
from byzguard.processor import PENDING, AuditJoinProcessor, AuditOutput
from byzguard.routing import H_VERDICT, repartition_headers, repartitioned_from
from tables.audit import audit_table_name
from topics.audit import repartition_topic_name

log = logging.getLogger(__name__)


def send_checks(rule: AuditRule, recorder: CheckRecorder, checks: Sequence[Check], wall: float, out: RecordBatches,
                partitions: int) -> None:
    """Count `checks` in the metrics and add their discrepancies to `out` (the rule's audit topic, at the
    partition Kafka's default partitioner gives the key among `partitions`)."""
    recorder.record(checks, wall)
    for check in checks:
        disc = check.discrepancy
        if disc is not None:
            key = disc.key.encode()
            out.add(rule.discrepancies_topic, partition_for(key, partitions), key, disc.to_bytes(),
                    [(H_AUDIT_RULE, rule.name.encode()), (H_AUDIT_KIND, disc.kind.value.encode())])


class AuditForward:
    """An audit rule's forward stage: verified records of its sides re-keyed by join key (see the module doc).
    Suspect records of fail-open routes are on the verified topic too, but they were not verified: skipped."""

    def __init__(self, app_id: str, config: GuardConfig, rule: AuditRule, recorder: CheckRecorder) -> None:
        self.rule = rule
        self.recorder = recorder
        self.routes = {r.verified_topic: r for r in config.routes}
        self.target = repartition_topic_name(app_id, rule)
        self.topics: tuple[str, ...] = tuple(rule.topics)
        self.outputs: tuple[str, ...] = (self.target, rule.discrepancies_topic)
        self.keyed: tuple[str, ...] = (rule.discrepancies_topic,)
        self.discrepancy_partitions = 1

    def configure(self, limits: dict[str, int], partitions: dict[str, int]) -> None:
        self.discrepancy_partitions = partitions.get(self.rule.discrepancies_topic, 1)

    def forward(self, msg: Any, out: RecordBatches, now: float) -> None:
        rule = self.rule
        route = self.routes.get(msg.topic)
        if route is None or header(msg.headers, H_VERDICT) == b"suspect":
            return
        env = decode(msg.key, msg.value, msg.headers or (), default_type=route.default_type)
        if isinstance(env, tuple):
            return
        verified = msg.timestamp / 1000  # aiokafka's timestamps are in ms
        at = event_time(env.time, verified)
        for side in rule.sides_of(msg.topic, env.type):
            item = observation_of(rule, side, env.data(), subject=env.subject, event_id=env.id, at=at)
            if isinstance(item, Observation):
                key = item.key.encode()
                out.add(self.target, partition_for(key, rule.partitions), key, item.to_bytes(),
                        repartition_headers((), msg.topic, msg.partition, msg.offset, verified))
            elif item is not None:
                send_checks(rule, self.recorder, [item], time.time(), out, self.discrepancy_partitions)


class AuditJoins:
    """The join stage of every audit rule: one AuditJoinProcessor and one join table per partition of a rule's
    repartition topic this worker owns (see the module doc)."""

    def __init__(self, rules: Sequence[AuditRule], recorders: dict[str, CheckRecorder], ctx: StageContext,
                 tabledir: Path, store_options: dict[str, Any], drains: SourceDrains | None = None) -> None:
        self.ctx = ctx
        self.tabledir = tabledir
        self.store_options = store_options
        self.recorders = recorders
        self.rule_of = {repartition_topic_name(ctx.app_id, rule): rule for rule in rules}
        self.topics = frozenset(self.rule_of)
        self.producer: AIOKafkaProducer | None = None
        self.discrepancy_partitions: dict[str, int] = {}
        self.parts: dict[TopicPartition, PartitionState] = {}
        self.processors: dict[TopicPartition, AuditJoinProcessor] = {}
        self.txns: dict[TopicPartition, AIOKafkaProducer] = {}
        self.punctuated: dict[TopicPartition, float] = {}
        #: How far each source partition was drained into each join partition (read beside the loop; None: never
        #: known, so a quiet source holds its joins' windows for good).
        self.drains = drains
        #: Per join partition, when its held watermark was last logged.
        self.warned: dict[TopicPartition, float] = {}

    def changelog(self, rule: AuditRule) -> str:
        """The join table's changelog topic (faust's `<app_id>-<table>-changelog`)."""
        return f"{self.ctx.app_id}-{audit_table_name(rule)}-changelog"

    async def start(self, producer: AIOKafkaProducer | None) -> None:
        self.producer = producer
        rules = self.rule_of.values()
        counts = await partition_counts(self.ctx.bootstrap, [r.discrepancies_topic for r in rules])
        self.discrepancy_partitions = {r.name: counts.get(r.discrepancies_topic, 1) for r in rules}
        if self.drains is not None:
            self.drains.start()

    async def assigned(self, tps: set[TopicPartition]) -> dict[TopicPartition, int]:
        opened: list[TopicPartition] = []
        for tp in sorted(tps):
            if tp in self.parts:
                continue
            rule = self.rule_of[tp.topic]
            if self.ctx.eos:  # fence the previous owner (its open transaction is aborted) before reading state
                self.txns[tp] = await self.ctx.transactional(f"{self.ctx.app_id}-audit-{rule.name}-{tp.partition}",
                                                             [tp.topic])
            self.parts[tp] = PartitionState(self.tabledir, None, tp.partition, self.store_options,
                                            tables={PENDING: audit_table_name(rule)})
            self.punctuated[tp] = time.monotonic()
            opened.append(tp)
        await restore(self.ctx.bootstrap, [(self.parts[tp], {PENDING: self.changelog(self.rule_of[tp.topic])})
                                           for tp in opened])
        stored: dict[TopicPartition, int] = {}
        for tp in opened:
            self.open_processor(tp)
            offsets = self.parts[tp].input_offsets()
            if tp.topic in offsets:
                stored[tp] = offsets[tp.topic]
        return stored

    async def revoked(self, tps: Iterable[TopicPartition]) -> None:
        for tp in list(tps):
            part = self.parts.pop(tp, None)
            if part is not None:
                part.close()
            self.processors.pop(tp, None)
            self.punctuated.pop(tp, None)
            self.warned.pop(tp, None)
            txn = self.txns.pop(tp, None)
            if txn is not None:
                await txn.stop()

    async def batch(self, tp: TopicPartition, messages: list[Any], end: int,
                    offsets: dict[TopicPartition, int]) -> None:
        rule = self.rule_of[tp.topic]
        if not messages:  # only transaction markers or aborted records were passed
            await self._finish(tp, rule, self._out(tp), {tp: end})
            offsets[tp] = end
        index, count = 0, len(messages)
        while index < count:
            out = self._out(tp)
            started = time.monotonic()
            stop = min(count, index + self.ctx.max_records)
            last = index
            repeats = 0
            while last < stop:
                repeats += self._join(tp, rule, messages[last], out)
                last += 1
                if time.monotonic() - started >= self.ctx.max_seconds:
                    break
            if repeats:
                log.info("audit %s: %s[%d]: %d observation(s) joined before (delivered again) skipped", rule.name,
                         tp.topic, tp.partition, repeats)
            if time.monotonic() - self.punctuated[tp] >= rule.tick_interval:
                self._punctuate(tp, rule, out)
            next_offset = messages[last - 1].offset + 1 if last < count else end
            await self._finish(tp, rule, out, {tp: next_offset})
            offsets[tp] = next_offset
            index = last

    def open_processor(self, tp: TopicPartition) -> None:
        """A new join processor for `tp`, its watermark as the table holds it, told its sources if known."""
        rule = self.rule_of[tp.topic]
        processor = self.processors[tp] = AuditJoinProcessor(rule)
        processor.resume(self.parts[tp].readers)
        if self.drains is not None:
            processor.watermark.know(self.drains.sources.get(rule.name, ()))

    async def idle(self) -> None:
        """Every join partition's watermark learns its sources and how far each was drained into it
        (app/runtime/watermarks.py); partitions whose windows were not checked for `tick_interval` get a
        punctuation of their own."""
        if not self.parts:
            return
        now, wall = time.monotonic(), time.time()
        lag: dict[str, float] = {}
        for tp in list(self.parts):
            rule = self.rule_of[tp.topic]
            self._drained(tp, rule, wall)
            at = self.processors[tp].watermark.time
            lag[rule.name] = max(lag.get(rule.name, 0.0), wall - at if at is not None else 0.0)
            if now - self.punctuated[tp] >= rule.tick_interval:
                out = self._out(tp)
                self._punctuate(tp, rule, out)
                await self._finish(tp, rule, out, {})
        for name, seconds in lag.items():
            metrics.AUDIT_WATERMARK_LAG.labels(rule=name).set(max(0.0, seconds))

    def _drained(self, tp: TopicPartition, rule: AuditRule, wall: float) -> None:
        """Tell the partition's watermark its sources and how far each was drained; log a watermark held longer
        than the rule's window and grace (once a minute)."""
        drains = self.drains
        if drains is None:
            return
        mark = self.processors[tp].watermark
        sources = drains.sources.get(rule.name, ())
        mark.know(sources)
        for source in sources:
            through = drains.through(source, tp)
            if through is not None:
                mark.drained(source, min(through, wall))
        held = wall - mark.time if mark.time is not None else None
        if held is not None and held > rule.within + rule.grace and wall - self.warned.get(tp, 0.0) >= 60:
            self.warned[tp] = wall
            behind = ", ".join(f"{t}[{p}]" for t, p in mark.behind()[:4])
            log.warning("audit %s: %s[%d]: windows held %.0f s behind the wall clock by source partition(s) %s%s",
                        rule.name, tp.topic, tp.partition, held, behind or "(none known)",
                        " (their progress cannot be read)" if drains.failing else " (not drained yet)")

    async def stop(self) -> None:
        await self.revoked(list(self.parts))
        if self.drains is not None:
            await self.drains.stop()

    def _out(self, tp: TopicPartition) -> RecordBatches:
        return RecordBatches(self.txns[tp] if self.ctx.eos else self.producer)

    def _join(self, tp: TopicPartition, rule: AuditRule, msg: Any, out: RecordBatches) -> bool:
        """Join one observation record; True if it was joined before (a repeat, skipped)."""
        if not msg.value or msg.key is None:
            return False  # a tick record of the faust runtime: the punctuations do its work here
        try:
            obs = Observation.from_bytes(msg.value)
        except (ValueError, TypeError, KeyError) as exc:  # not byzguard's: it must not stop every audit
            log.error("audit %s: %s[%d]@%d is not an observation (%r); skipped", rule.name, tp.topic, tp.partition,
                      msg.offset, exc)
            return False
        origin = repartitioned_from(msg.headers)
        if origin is not None:  # where its verified record is: a redelivered observation is skipped
            obs = replace(obs, origin=origin[:3])
        wall = time.time()
        result = self.processors[tp].process(obs, self.parts[tp].readers, wall)
        self._report(rule, result, wall, out)
        return result.repeated

    def _punctuate(self, tp: TopicPartition, rule: AuditRule, out: RecordBatches) -> None:
        """Report and forget what waited in this partition past its window (and the grace)."""
        wall = time.time()
        self.punctuated[tp] = time.monotonic()
        self._report(rule, self.processors[tp].punctuate(self.parts[tp].readers, wall), wall, out)
        self.recorders[rule.name].refresh(wall)

    def _report(self, rule: AuditRule, result: AuditOutput, wall: float, out: RecordBatches) -> None:
        for key, why in result.unreadable:
            log.error("audit %s: join state of key %r dropped: %s", rule.name, key, why)
        send_checks(rule, self.recorders[rule.name], result.checks, wall, out, self.discrepancy_partitions[rule.name])

    async def _finish(self, tp: TopicPartition, rule: AuditRule, out: RecordBatches,
                      offsets: dict[TopicPartition, int]) -> None:
        part = self.parts[tp]
        # The stream time, if it moved: with the batch's writes; alone (a transaction of its own on a quiet
        # partition) only once it moved by a window, so a quiet worker does not write every tick.
        self.processors[tp].keep(part.readers, 0.0 if out or part.pending[PENDING] or offsets else rule.within)
        changelog = self.changelog(rule)
        writes = part.pending[PENDING]
        if self.ctx.eos:
            if not out and not writes and not offsets:
                return
            for key, value in writes.items():
                out.add(changelog, tp.partition, key, value)
            try:
                delivered = await commit(self.txns[tp], out, offsets, self.ctx.group)
            except BaseException:
                part.discard()
                self.open_processor(tp)  # its watermark saw the aborted records
                raise
        else:
            await out.deliver()  # the discrepancies first: a changelog never holds state of an undelivered output
            cl = RecordBatches(self.producer)
            for key, value in writes.items():
                cl.add(changelog, tp.partition, key, value)
            delivered = await cl.deliver()
        last = delivered.get((changelog, tp.partition))
        part.store({PENDING: last} if last is not None else {}, {t.topic: o for t, o in offsets.items()})


def audit_stages(config: GuardConfig, ctx: StageContext, tabledir: Path,
                 store_options: dict[str, Any]) -> tuple[list[AuditForward], AuditJoins]:
    """The forward stages and the join stage of every audit rule of `config`."""
    recorders = {rule.name: CheckRecorder(rule) for rule in config.audits}
    forwards = [AuditForward(ctx.app_id, config, rule, recorders[rule.name]) for rule in config.audits]
    drains = SourceDrains(ctx.app_id, config, ctx.bootstrap, ctx.group) if config.audits else None
    return forwards, AuditJoins(config.audits, recorders, ctx, tabledir, store_options, drains)

