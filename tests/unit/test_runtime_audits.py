"""app/runtime/audits.py without a broker: what an audit rule's forward stage maps a verified record to, and the
join table's files, and the join stage over a real RocksDB partition (pairs, windows closed by punctuations, late
and redelivered observations), and what its batches send in which order, against a stand-in for aiokafka's
producer (its batches and transactions on the real broker: tests/integration/test_audit.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from agents.audit import H_AUDIT_KIND, H_AUDIT_RULE, CheckRecorder
from app.runtime import audits
from app.runtime.audits import AuditForward, AuditJoins
from app.runtime.stages import StageContext
from app.runtime.state import INPUTS_KEY, PartitionState
from byzguard.audit import Observation, Side
from byzguard.partitioner import partition_for
from byzguard.processor import PENDING
from byzguard.routing import H_VERDICT, repartition_headers, repartitioned_from
from byzguard.stamp import Stamper
from tables.audit import audit_table_name
from tests.unit.test_runtime_loop import Builder
from tests.unit.test_runtime_stages import Msg, Out, _config
from topics.audit import repartition_topic_name


def _verified(kind: str, data: dict[str, Any], subject: str, *, verdict: bytes = b"verified") -> Msg:
    stamped = Stamper("orders").binary(data, type=kind, subject=subject, version=1, time=1_800_000_000.0)
    return Msg("out", 0, 0, stamped.key, stamped.value, [*stamped.headers, (H_VERDICT, verdict)])


def test_the_audit_forward_stage_rekeys_observations_by_join_key(tmp_path: Path) -> None:
    """A verified record of a rule's side becomes an observation keyed by its join key at the key's murmur2
    partition of `<app_id>-audit-<rule>-repartition`; a suspect record (fail-open) and other types are skipped."""
    config = _config(tmp_path)
    rule = config.audits[0]
    stage = AuditForward("app", config, rule, CheckRecorder(rule))
    stage.configure({}, {"audit.discrepancies": 6})
    out = Out()
    stage.forward(_verified("order.confirmed", {"paymentId": "pay-7", "total": 100}, "order-7"), out, 0.0)  # type: ignore[arg-type]
    stage.forward(_verified("order.confirmed", {"paymentId": "pay-8", "total": 1}, "order-8", verdict=b"suspect"),
                  out, 0.0)  # type: ignore[arg-type]
    [(topic, partition, key, value, headers)] = out.records
    assert (topic, partition, key) == (repartition_topic_name("app", rule), partition_for(b"pay-7", 5), b"pay-7")
    assert repartitioned_from(headers) == ("out", 0, 0, 1_800_000_000.0)  # the verified record it was made of
    assert orjson.loads(value or b"null")  # an Observation (byzguard.audit round-trips it)


def test_an_observation_is_timed_by_its_event_time_not_by_when_it_was_verified(tmp_path: Path) -> None:
    """An order whose envelope says it happened at T but that was verified (its verified record's timestamp) an
    hour later is observed at T; the repartition record still names its verified record and that timestamp."""
    config = _config(tmp_path)
    rule = config.audits[0]
    stage = AuditForward("app", config, rule, CheckRecorder(rule))
    out = Out()
    msg = _verified("order.confirmed", {"paymentId": "pay-7", "total": 100}, "order-7")  # event time 1.8e9 s
    msg.timestamp = 1_800_003_600_000  # verified an hour later (ms)
    stage.forward(msg, out, 0.0)  # type: ignore[arg-type]
    [(_, _, _, value, headers)] = out.records
    assert Observation.from_bytes(value or b"").at == 1_800_000_000.0
    assert repartitioned_from(headers) == ("out", 0, 0, 1_800_003_600.0)


def test_a_subject_record_without_a_join_key_is_a_missing_discrepancy_at_once(tmp_path: Path) -> None:
    """An order with no payment id cannot be joined: it is a `missing` discrepancy on the audit topic at once,
    keyed and with the headers the faust runtime gives it, at the key's partition of the audit topic."""
    config = _config(tmp_path)
    rule = config.audits[0]
    stage = AuditForward("app", config, rule, CheckRecorder(rule))
    stage.configure({}, {"audit.discrepancies": 6})
    out = Out()
    stage.forward(_verified("order.confirmed", {"total": 100}, "order-9"), out, 0.0)  # type: ignore[arg-type]
    [(topic, partition, key, value, headers)] = out.records
    assert topic == "audit.discrepancies" and key is not None and partition == partition_for(key, 6)
    assert headers == [(H_AUDIT_RULE, b"paid"), (H_AUDIT_KIND, b"missing")]
    assert orjson.loads(value or b"{}")["kind"] == "missing"


def test_the_audit_join_table_is_fausts_and_holds_its_input_offsets(tmp_path: Path) -> None:
    """A join partition's database is faust's file of the rule's table (`audit-<rule>-pending_by_key-<p>.db`);
    a store writes its state and its next input offset together, read back after a reopen."""
    opts: dict[str, Any] = {}
    part = PartitionState(tmp_path, None, 2, opts, tables={PENDING: "audit-paid-pending_by_key"})
    assert part.paths == {PENDING: tmp_path / "audit-paid-pending_by_key-2.db"}
    part.readers[PENDING].put(b"pay-7", b"state")
    part.store({PENDING: 12}, {"app-audit-paid-repartition": 40})
    part.close()
    again = PartitionState(tmp_path, None, 2, opts, tables={PENDING: "audit-paid-pending_by_key"})
    assert again.readers[PENDING].get(b"pay-7") == b"state"
    assert again.input_offsets() == {"app-audit-paid-repartition": 40} and again.changelog_offset(PENDING) == 12
    assert set(again.readers) == {PENDING}
    assert again.dbs[PENDING].get(INPUTS_KEY) is not None
    again.close()


# -- the join stage (AuditJoins) over a real RocksDB partition, without a broker --------------------------------

class _Clock:
    """The wall and monotonic clocks the join stage reads, set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


#: The rule's source partitions: the verified topic `out` has three.
SOURCES = (("out", 0), ("out", 1), ("out", 2))


class _Drains:
    """A stand-in for SourceDrains (app/runtime/watermarks.py): how far each source partition was drained, as
    the test sets it."""

    def __init__(self) -> None:
        self.sources = {"paid": SOURCES}
        self.at: dict[tuple[str, int], float] = {}
        self.failing = False

    def through(self, source: tuple[str, int], join: TopicPartition) -> float | None:
        return self.at.get(source)


class _Join:
    """One join partition of rule `paid` (60 s window, 5 s grace) as AuditJoins runs it: observations as the
    forward stage sends them, punctuations, and each batch stored as the runtime stores it. After each batch and
    at each punctuation the watermark learns, as the loop's idle step does, how far the source partitions were
    drained: every one of `drained` through the clock's time (all three unless set otherwise: none while a
    backlog waits upstream, or the broker is out of reach)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, now: float) -> None:
        self.config = _config(tmp_path)
        self.rule = self.config.audits[0]
        self.clock = _Clock(now)
        monkeypatch.setattr(audits, "time", self.clock)
        ctx = StageContext(app_id="app", bootstrap="-", group="g", eos=False, producer_options={}, max_records=100,
                           max_seconds=1.0)
        self.tabledir = tmp_path / "tables"
        self.drains = _Drains()
        self.joins = AuditJoins(self.config.audits, {"paid": CheckRecorder(self.rule)}, ctx, self.tabledir, {},
                                self.drains)  # type: ignore[arg-type]
        self.joins.discrepancy_partitions = {"paid": 1}
        self.tp = TopicPartition(repartition_topic_name("app", self.rule), 0)
        self.offset = 0
        self.drained: tuple[tuple[str, int], ...] = SOURCES
        self.open()

    def open(self) -> None:
        """Open the partition as an assignment does (a new processor, its watermark read from the table)."""
        self.joins.parts[self.tp] = PartitionState(self.tabledir, None, 0, {},
                                                   tables={PENDING: audit_table_name(self.rule)})
        self.joins.open_processor(self.tp)
        self.joins.punctuated[self.tp] = self.clock.now

    @property
    def stream_time(self) -> float | None:
        """The partition's watermark."""
        return self.joins.processors[self.tp].watermark.time

    def tick(self) -> None:
        """The loop's idle step at the clock's time: the `drained` sources are drained through it."""
        for source in self.drained:
            self.drains.at[source] = self.clock.now
        self.joins._drained(self.tp, self.rule, self.clock.now)

    def reopen(self) -> None:
        """A restart on the same data dir: the stored state is read back, the processor is new."""
        self.joins.parts[self.tp].close()
        self.open()

    def observe(self, side: str, key: str, entity: str, value: float, at: float, *,
                origin: int | None = None, partition: int = 0) -> list[dict[str, Any]]:
        """One observation (from `out`[`partition`]@`origin` unless None) joined in a batch of its own; its
        discrepancies."""
        obs = Observation(Side(side), key, entity, f"id-{entity}", at, value, True)
        headers = [] if origin is None else repartition_headers((), "out", partition, origin, at)
        msg = Msg(self.tp.topic, 0, self.offset, key.encode(), obs.to_bytes(), headers)
        self.offset += 1
        out = Out()
        self.joins._join(self.tp, self.rule, msg, out)  # type: ignore[arg-type]
        found = self._stored(out)
        self.tick()
        return found

    def punctuate(self) -> list[dict[str, Any]]:
        """A punctuation at the clock's time (after a tick); its discrepancies."""
        self.tick()
        out = Out()
        self.joins._punctuate(self.tp, self.rule, out)  # type: ignore[arg-type]
        return self._stored(out)

    def _stored(self, out: Out) -> list[dict[str, Any]]:
        self.joins.processors[self.tp].keep(self.joins.parts[self.tp].readers)  # as _finish does
        self.joins.parts[self.tp].store({}, {self.tp.topic: self.offset})
        return [orjson.loads(value or b"{}") for _, _, _, value, _ in out.records]


T0 = 1_800_000_000.0


def test_the_join_checks_a_pair_from_either_side_once_and_reports_a_mismatch(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An order and its payment pair in either order: equal amounts pass silently, unequal ones are one
    `mismatch` naming both values; the pair's check is made once, not again at the window's end."""
    join = _Join(tmp_path, monkeypatch, T0)
    assert join.observe("left", "pay-1", "order-1", 100, T0, origin=1) == []
    assert join.observe("right", "pay-1", "payment-1", 100, T0 + 1, origin=2) == []
    assert join.observe("right", "pay-2", "payment-2", 90, T0 + 2, origin=3) == []
    [disc] = join.observe("left", "pay-2", "order-2", 100, T0 + 3, origin=4)
    assert (disc["kind"], disc["serviceA"]["value"], disc["serviceB"]["value"]) == ("mismatch", 100, 90)
    join.clock.now = T0 + 3600
    assert join.punctuate() == []


def test_a_window_closes_as_a_punctuation_after_the_grace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An order alone is reported `missing` by the first punctuation after its window and the grace (60 s + 5 s),
    not before; a payment alone is no discrepancy (the rule requires the left side only)."""
    join = _Join(tmp_path, monkeypatch, T0)
    join.observe("left", "pay-1", "order-1", 100, T0, origin=1)
    join.observe("right", "pay-9", "payment-9", 5, T0, origin=2)
    join.clock.now = T0 + 64
    assert join.punctuate() == []
    join.clock.now = T0 + 66
    [disc] = join.punctuate()
    assert (disc["kind"], disc["key"], disc["entity"]) == ("missing", "pay-1", "order-1")
    assert join.punctuate() == []


def test_a_counterpart_later_than_the_window_does_not_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A payment timed 75 s after its order (window 60 s) is late: it closes the order's window on arrival (the
    partition's watermark passed it), so the order is `missing`; the payment waits unpaired."""
    join = _Join(tmp_path, monkeypatch, T0)
    join.observe("left", "pay-1", "order-1", 100, T0, origin=1)
    join.clock.now = T0 + 80
    join.tick()
    [disc] = join.observe("right", "pay-1", "payment-1", 100, T0 + 75, origin=2)
    assert (disc["kind"], disc["key"]) == ("missing", "pay-1")


def test_a_redelivered_observation_is_skipped_even_after_its_pair_was_forgotten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """at_least_once delivers an observation again after a crash, maybe after its pair's window was forgotten:
    it is recognised by its verified record's coordinates (kept in the stored state, so across a restart too)
    and skipped, not kept waiting alone and reported `missing`; a new record of the source partition is not."""
    join = _Join(tmp_path, monkeypatch, T0)
    join.observe("left", "pay-1", "order-1", 100, T0, origin=7)
    join.observe("right", "pay-1", "payment-1", 100, T0 + 1, origin=8)
    join.clock.now = T0 + 120
    assert join.punctuate() == []  # the pair is forgotten
    join.reopen()  # the order's source partition was not committed; the payment's was
    assert join.observe("left", "pay-1", "order-1", 100, T0, origin=7) == []
    join.clock.now = T0 + 240
    assert join.punctuate() == []
    join.observe("left", "pay-3", "order-3", 100, T0 + 240, origin=9)
    join.clock.now = T0 + 400
    assert [d["key"] for d in join.punctuate()] == ["pay-3"]


def test_without_its_coordinates_a_late_repeat_would_be_reported_missing(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """What the coordinates prevent: an observation without them (the faust runtime's records) that comes again
    after its pair was forgotten waits alone and is reported `missing`."""
    join = _Join(tmp_path, monkeypatch, T0)
    join.observe("left", "pay-1", "order-1", 100, T0)
    join.observe("right", "pay-1", "payment-1", 100, T0 + 1)
    join.clock.now = T0 + 120
    assert join.punctuate() == []
    join.observe("left", "pay-1", "order-1", 100, T0)
    join.clock.now = T0 + 240
    assert [d["kind"] for d in join.punctuate()] == ["missing"]


def test_a_payment_joined_after_an_outage_longer_than_the_window_pairs(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An order joined before an outage and its payment (event time a second later) joined ten minutes later,
    while the worker was behind all along (punctuations ran), pair: no `missing`, no discrepancy after either."""
    join = _Join(tmp_path, monkeypatch, T0)
    assert join.observe("left", "pay-1", "order-1", 100, T0, origin=1) == []
    join.drained = ()  # the broker out of reach, then a backlog being drained
    for wall in range(30, 600, 30):
        join.clock.now = T0 + wall
        assert join.punctuate() == []
    assert join.observe("right", "pay-1", "payment-1", 100, T0 + 1, origin=2) == []
    join.drained = SOURCES
    for wall in (600, 700, 800):
        join.clock.now = T0 + wall
        assert join.punctuate() == []


def test_a_restart_resumes_the_watermark_from_the_table_not_the_wall_clock(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker restarted ten minutes after it stopped resumes its partition's watermark from the join table, so
    the order waiting in it is not closed by the wall clock before the backlog's payment comes (the side reads
    find it upstream: no source is drained): they pair."""
    join = _Join(tmp_path, monkeypatch, T0)
    join.observe("left", "pay-1", "order-1", 100, T0, origin=1)
    assert join.punctuate() == []  # every source drained through T0: the watermark, kept
    join.clock.now = T0 + 600
    join.reopen()
    assert join.stream_time == T0
    join.drained = ()
    assert join.punctuate() == []
    join.clock.now = T0 + 601
    assert join.punctuate() == []
    assert join.observe("right", "pay-1", "payment-1", 100, T0 + 1, origin=2) == []


def test_a_real_missing_payment_is_reported_on_a_quiet_stream_once_every_source_is_drained_past_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a quiet stream an order never paid is reported `missing` once every source partition was drained past
    its window and the grace (60 s + 5 s): not while one of them is not (a backlog upstream, a partition the
    broker refuses), however far the others are, and after a restart too."""
    join = _Join(tmp_path, monkeypatch, T0)
    join.observe("left", "pay-1", "order-1", 100, T0, origin=1)
    join.drained = ()
    join.clock.now = T0 + 300
    assert join.punctuate() == []
    join.reopen()
    join.drained = SOURCES[:2]  # out[2] held up
    join.clock.now = T0 + 406
    assert join.punctuate() == []
    assert join.stream_time == T0
    join.drained = SOURCES
    [disc] = join.punctuate()
    assert (disc["kind"], disc["key"]) == ("missing", "pay-1")


def test_one_stalled_source_partition_holds_the_windows_the_others_would_close(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's case: orders flow from out[0] and out[1] for five minutes past an order's window while out[2],
    which holds its payment, is refused (nothing comes from it, it is not drained): no `missing`; the payment then
    pairs, and another order whose payment never comes is reported once out[2] is past its window too."""
    join = _Join(tmp_path, monkeypatch, T0)
    join.drained = ()
    join.observe("left", "pay-1", "order-1", 100, T0, origin=1)
    join.observe("left", "pay-2", "order-2", 7, T0, origin=2, partition=1)
    for n, wall in enumerate(range(10, 300, 10), start=3):
        join.clock.now = T0 + wall
        assert join.observe("left", f"pay-x{n}", f"order-x{n}", 1, T0 + wall, origin=n, partition=n % 2) == []
        assert join.observe("right", f"pay-x{n}", f"payment-x{n}", 1, T0 + wall, origin=n, partition=n % 2) == []
        assert join.punctuate() == []
    assert join.stream_time is None  # out[2] was neither heard from nor drained
    assert join.observe("right", "pay-1", "payment-1", 100, T0 + 2, origin=1, partition=2) == []
    assert join.stream_time == T0 + 2
    assert join.observe("right", "pay-9", "payment-9", 1, T0 + 300, origin=2, partition=2) == []
    [disc] = join.punctuate()
    assert (disc["kind"], disc["key"]) == ("missing", "pay-2")
    assert join.punctuate() == []


def test_join_state_with_the_stream_time_of_the_release_before_is_read(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A join table written by the release before, with its stream time (under the clock key) and no source
    progress, resumes that time as the watermark: an order past its window by that time is reported at the first
    punctuation, one inside it only once every source partition is past it."""
    from byzguard.audit import JoinState
    from byzguard.processor import CLOCK_KEY

    join = _Join(tmp_path, monkeypatch, T0 + 600)
    table = join.joins.parts[join.tp]
    old = {b"pay-1": JoinState((Observation(Side.LEFT, "pay-1", "order-1", "id-order-1", T0, 100, True),)),
           b"pay-2": JoinState((Observation(Side.LEFT, "pay-2", "order-2", "id-order-2", T0 + 100, 5, True),))}
    for key, state in old.items():
        table.readers[PENDING].put(key, state.to_bytes())
    table.readers[PENDING].put(CLOCK_KEY, repr(T0 + 120).encode())
    table.store({}, {join.tp.topic: 3})
    join.reopen()
    assert join.stream_time == T0 + 120
    join.drained = SOURCES[1:]
    [disc] = join.punctuate()
    assert (disc["kind"], disc["key"]) == ("missing", "pay-1")
    join.drained = SOURCES
    [disc] = join.punctuate()
    assert (disc["kind"], disc["key"]) == ("missing", "pay-2")


def test_join_state_of_the_current_release_without_a_stream_time_is_read(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A join table written by the release before (join states and source offsets, no stream time) is read: the
    stream time resumes at its newest observation, the waiting order pairs with its payment, the stored source
    offset still skips a repeat, and an order left alone is reported `missing` after its window."""
    from byzguard.audit import JoinState
    from byzguard.processor import CLOCK_KEY, SOURCE_PREFIX

    join = _Join(tmp_path, monkeypatch, T0 + 600)
    join.drained = ()  # the payment below is still upstream
    table = join.joins.parts[join.tp]
    old = {b"pay-1": JoinState((Observation(Side.LEFT, "pay-1", "order-1", "id-order-1", T0, 100, True),)),
           b"pay-2": JoinState((Observation(Side.LEFT, "pay-2", "order-2", "id-order-2", T0 + 10, 5, True),))}
    for key, state in old.items():
        table.readers[PENDING].put(key, state.to_bytes())
    table.readers[PENDING].put(SOURCE_PREFIX + b"right\x00out\x000", b"5")
    table.store({}, {join.tp.topic: 3})
    join.reopen()
    assert table is not join.joins.parts[join.tp] and join.stream_time == T0 + 10
    assert join.joins.parts[join.tp].readers[PENDING].get(CLOCK_KEY) is None
    assert join.observe("right", "pay-1", "payment-1", 99, T0 + 1, origin=5) == []  # a repeat: skipped
    [disc] = join.observe("right", "pay-1", "payment-1", 99, T0 + 1, origin=6)
    assert (disc["kind"], disc["key"]) == ("mismatch", "pay-1")
    join.clock.now = T0 + 680
    join.drained = SOURCES
    [disc] = join.punctuate()
    assert (disc["kind"], disc["key"]) == ("missing", "pay-2")
    assert join.joins.parts[join.tp].readers[PENDING].get(CLOCK_KEY) is not None


# -- the join stage's batches: transactions (exactly_once), delivery order (at_least_once) -----------------------

class _Producer:
    """aiokafka's (transactional) producer as the join stage uses it: each batch is delivered at once, or, for a
    topic in `refused`, never; `fail_commit`: the transaction's commit fails. `log` has what happened, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []
        self.next: dict[tuple[str, int], int] = {}
        self.fail_commit = False
        self.refused: set[str] = set()
        #: What the runtime drives a transaction through (aiokafka's TransactionManager: stages.begin, transact).
        self._txn_manager = _Manager(self)

    def create_batch(self) -> Builder:
        return Builder()

    async def send_batch(self, batch: Builder, topic: str, partition: int) -> asyncio.Future[Any]:
        self.log.append(("sent", topic))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if topic in self.refused:
            fut.set_exception(KafkaError(f"{topic} refused"))
            return fut
        offset = self.next.get((topic, partition), 0)
        self.next[(topic, partition)] = offset + batch.record_count()
        fut.set_result(SimpleNamespace(offset=offset))
        return fut

    async def begin_transaction(self) -> None:
        self.log.append(("begin",))

    async def commit_transaction(self) -> None:
        if self.fail_commit:
            raise KafkaError("the transaction failed")
        self.log.append(("commit",))

    async def abort_transaction(self) -> None:
        self.log.append(("abort",))


class _Manager:
    """aiokafka's TransactionManager over `_Producer`: the offsets are answered at once, the commit is
    `_Producer.commit_transaction`."""

    def __init__(self, producer: _Producer) -> None:
        self.producer = producer
        self.ended: asyncio.Future[None] | None = None

    def has_pid(self) -> bool:
        return True

    def begin_transaction(self) -> None:
        self.producer.log.append(("begin",))

    def is_in_transaction(self) -> bool:
        return True

    def add_offsets_to_txn(self, offsets: dict[TopicPartition, Any], group: str) -> asyncio.Future[None]:
        self.producer.log.extend(("offsets", tp.topic, str(offset.offset)) for tp, offset in offsets.items())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def committing_transaction(self) -> None:
        self.ended = asyncio.ensure_future(self.producer.commit_transaction())

    def wait_for_transaction_end(self) -> asyncio.Future[None]:
        assert self.ended is not None
        return self.ended


def _observation(join: _Join, side: str, key: str, entity: str, at: float, origin: int) -> Msg:
    obs = Observation(Side(side), key, entity, f"id-{entity}", at, 100, True)
    msg = Msg(join.tp.topic, 0, join.offset, key.encode(), obs.to_bytes(),
              repartition_headers((), "out", 0, origin, at))
    join.offset += 1
    return msg


async def test_exactly_once_a_join_batch_and_an_idle_punctuation_are_each_one_transaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """exactly_once: a batch of the join's input is one transaction (its changelog records and its input offset);
    a window closed by the idle step's punctuation is one of its own (the discrepancy, the changelog records that
    forget the order; no offsets); RocksDB gets each batch's state only once its transaction committed."""
    join = _Join(tmp_path, monkeypatch, T0)
    join.joins.ctx.eos = True
    txn = join.joins.txns[join.tp] = _Producer()  # type: ignore[assignment]
    changelog, discrepancies = join.joins.changelog(join.rule), join.rule.discrepancies_topic
    part = join.joins.parts[join.tp]
    offsets: dict[TopicPartition, int] = {}
    await join.joins.batch(join.tp, [_observation(join, "left", "pay-1", "order-1", T0, 1)], 1, offsets)
    assert txn.log == [("begin",), ("sent", changelog), ("offsets", join.tp.topic, "1"), ("commit",)]
    assert offsets == {join.tp: 1} and part.input_offsets() == {join.tp.topic: 1}
    assert part.dbs[PENDING].get(b"pay-1") is not None and not part.pending[PENDING]
    txn.log.clear()
    join.clock.now = T0 + 66
    for source in SOURCES:
        join.drains.at[source] = join.clock.now
    await join.joins.idle()
    assert txn.log == [("begin",), ("sent", discrepancies), ("sent", changelog), ("commit",)]
    assert part.dbs[PENDING].get(b"pay-1") is None and not part.pending[PENDING]


async def test_exactly_once_a_failed_punctuation_transaction_leaves_the_stored_join_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """exactly_once: where the transaction of a punctuation fails, it is aborted, its writes are dropped (the
    order still waits in RocksDB), the processor is made again from the stored state (its watermark back where
    the table has it), and the error stops the loop."""
    join = _Join(tmp_path, monkeypatch, T0)
    join.joins.ctx.eos = True
    txn = join.joins.txns[join.tp] = _Producer()  # type: ignore[assignment]
    part = join.joins.parts[join.tp]
    await join.joins.batch(join.tp, [_observation(join, "left", "pay-1", "order-1", T0, 1)], 1, {})
    stored_time = join.stream_time
    txn.fail_commit = True
    join.clock.now = T0 + 66
    for source in SOURCES:
        join.drains.at[source] = join.clock.now
    processor = join.joins.processors[join.tp]
    with pytest.raises(KafkaError):
        await join.joins.idle()
    assert txn.log[-2:] == [("sent", join.joins.changelog(join.rule)), ("abort",)]
    assert part.dbs[PENDING].get(b"pay-1") is not None and not part.pending[PENDING]
    assert join.joins.processors[join.tp] is not processor and join.stream_time == stored_time


async def test_at_least_once_a_join_batch_delivers_its_discrepancies_then_its_changelog_then_stores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """at_least_once: a join batch's discrepancies are delivered before its changelog records, and RocksDB gets
    its state and input offset only after both; where the discrepancies are not delivered, neither the changelog
    nor the state goes anywhere (the loop commits nothing and stops)."""
    join = _Join(tmp_path, monkeypatch, T0)
    producer = join.joins.producer = _Producer()  # type: ignore[assignment]
    changelog, discrepancies = join.joins.changelog(join.rule), join.rule.discrepancies_topic
    part = join.joins.parts[join.tp]
    await join.joins.batch(join.tp, [_observation(join, "right", "pay-2", "payment-2", T0, 1)], 1, {})
    producer.log.clear()
    producer.refused.add(discrepancies)
    mismatch = Observation(Side("left"), "pay-2", "order-2", "id-order-2", T0 + 1, 90, True)
    msg = Msg(join.tp.topic, 0, 1, b"pay-2", mismatch.to_bytes(), repartition_headers((), "out", 0, 2, T0 + 1))
    offsets: dict[TopicPartition, int] = {}
    with pytest.raises(KafkaError):
        await join.joins.batch(join.tp, [msg], 2, offsets)
    assert producer.log == [("sent", discrepancies)] and offsets == {}
    assert part.input_offsets() == {join.tp.topic: 1}
    producer.refused.clear()
    part.discard()
    join.joins.open_processor(join.tp)
    await join.joins.batch(join.tp, [msg], 2, offsets)
    assert producer.log[1:] == [("sent", discrepancies), ("sent", changelog)]
    assert offsets == {join.tp: 2} and part.input_offsets() == {join.tp.topic: 2}


def test_a_restart_while_a_source_partition_stalls_does_not_close_the_windows_it_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker restarted (or a join transaction aborted) while one source partition is stalled resumes the
    watermark it had, none: the newest observation the table holds is no watermark of this release's table (the
    stalled source never got there), so the orders whose payments wait in the stalled partition are not reported
    `missing`; they pair once it comes."""
    join = _Join(tmp_path, monkeypatch, T0)
    join.drained = ()
    join.observe("left", "pay-1", "order-1", 100, T0, origin=1)
    for n, wall in enumerate(range(10, 300, 10), start=3):
        join.clock.now = T0 + wall
        join.observe("left", f"pay-x{n}", f"order-x{n}", 1, T0 + wall, origin=n, partition=n % 2)
        join.observe("right", f"pay-x{n}", f"payment-x{n}", 1, T0 + wall, origin=n, partition=n % 2)
    assert join.punctuate() == [] and join.stream_time is None  # out[2] neither heard from nor drained
    join.reopen()
    assert join.punctuate() == []
    assert join.stream_time is None
    assert join.observe("right", "pay-1", "payment-1", 100, T0 + 2, origin=1, partition=2) == []
