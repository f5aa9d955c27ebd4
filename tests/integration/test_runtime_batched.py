"""The batched runtime as worker processes on the real broker: verdicts with their codes, state reused across
restarts and taken over from the faust agent runtime of earlier releases, and every event in exactly one place
through SIGKILLs and through workers joining and leaving mid-stream."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faust.stores.rocksdb import RocksDBOptions

from app.provision import OUTPUT_HEADROOM, provision
from app.runtime.state import OFFSET_KEY, changelog_topic, state_names
from byzguard.config import load
from byzguard.guard import Guard, RecordIn
from byzguard.stamp import Stamped
from tables import TABLE_OF, store_options
from tests.chaos.test_crash import (
    EXPECTED_CODE,
    Stream,
    first_record_after,
    labeled_stream,
    merged,
    payments,
    produce_paced,
)
from tests.integration.test_poison import _set_limit, _wait_for
from tests.integration.worker_harness import (
    SECRETS,
    Events,
    Out,
    RouteNames,
    WorkerFactory,
    by_id,
    collect,
    input_group,
    produce,
    wait_caught_up,
    wipe,
)

pytestmark = pytest.mark.kafka

#: The RocksDB options of a worker's tables (the default settings).
STORE_OPTIONS = store_options(write_buffer_mb=8, block_cache_mb=8)


@pytest.fixture
def batched(worker_factory: WorkerFactory) -> WorkerFactory:
    """The test's workers (the batched runtime, the only one)."""
    return worker_factory


def _misrouted(stream: Stream, verified: list, quarantined: list, *, at_least_once: bool = False) -> dict[str, list]:
    """What happened to events that did not end where they must: each clean id once in verified, each bad id once
    in quarantine with its code, nothing else (under at_least_once an id may be repeated, never lost)."""
    in_verified, in_quarantine = by_id(verified), by_id(quarantined)
    problems: dict[str, list[str]] = {}
    for event_id, kind in sorted(stream.kind_of.items()):
        v, q = len(in_verified.get(event_id, [])), len(in_quarantine.get(event_id, []))
        if at_least_once:
            ok = (v >= 1 and q == 0) if kind == "clean" else (v == 0 and q >= 1)
        else:
            ok = (v, q) == ((1, 0) if kind == "clean" else (0, 1))
        if not ok:
            problems.setdefault(f"{kind} {v}x verified {q}x quarantined", []).append(event_id)
        elif kind != "clean" and EXPECTED_CODE[kind] not in in_quarantine[event_id][0].codes:
            problems.setdefault(f"{kind} quarantined for {sorted(in_quarantine[event_id][0].codes)}",
                                []).append(event_id)
    strangers = sorted((set(in_verified) | set(in_quarantine)) - set(stream.kind_of))
    if strangers:
        problems["in the outputs but never produced"] = strangers
    return problems


async def _outputs(bootstrap: str, route: RouteNames, stream: Stream) -> tuple[list[Out], list[Out]]:
    """What the route's verified and quarantine topics hold once every labeled event of `stream` is in one."""
    clean_ids = {i for i, kind in stream.kind_of.items() if kind == "clean"}
    verified = await collect(bootstrap, route.verified, expected=len(clean_ids), idle=3.0, timeout=60)
    quarantined = await collect(bootstrap, route.quarantine, expected=len(stream.kind_of) - len(clean_ids),
                                idle=3.0, timeout=60)
    return verified, quarantined


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_batched_runtime_routes_clean_and_faulty_events_with_their_codes(
    batched: WorkerFactory, guarantee: str,
) -> None:
    """Clean events reach the verified topic once; corrupted, regressed, forged and malformed ones reach quarantine
    with their codes (ENVELOPE.md); a re-sent event reaches neither; the worker says which runtime runs and
    commits the inputs in its own group."""
    batched.processing_guarantee = guarantee
    route = batched.configure(partitions=4)
    worker = batched.start("w1")
    events = Events()
    clean = [events.clean(f"order-{i}", v) for v in (1, 2) for i in range(8)] + [events.payment("pay-1", 1)]
    bad = {
        "integrity.mismatch": events.corrupted("order-0", 3),
        "version.regression": events.regression("order-1", 1),
        "source.forged": events.forged("pay-1", 2),
        "decode.malformed": events.malformed("order-2"),
    }
    await produce(batched.bootstrap, route.input, [*clean, *bad.values(), clean[3]])
    await wait_caught_up(batched.bootstrap, batched.app_id, [route.input], workers=[worker])

    verified = by_id(await collect(batched.bootstrap, route.verified, expected=len(clean)))
    quarantined = by_id(await collect(batched.bootstrap, route.quarantine, expected=len(bad)))
    assert {i: len(r) for i, r in verified.items()} == {s.event_id: 1 for s in clean}
    assert set(quarantined) == {s.event_id for s in bad.values()}
    for code, sent in bad.items():
        (out,) = quarantined[sent.event_id]
        assert code in out.codes, f"{sent.event_id}: {out.reasons}"
        assert out.header("byzguard_original_topic") == route.input.encode()
    log = worker.log_text()
    assert "runtime: batched" in log and f"batched runtime: {guarantee}" in log
    assert input_group(batched.app_id) != batched.app_id
    assert worker.stop() == 0, worker.fail("did not stop cleanly").args[0]


async def test_batched_runtime_reuses_its_state_after_a_restart(batched: WorkerFactory) -> None:
    """Stopped and restarted on its data dir, the worker replays nothing from the changelogs, still judges a
    re-sent event a duplicate and an old version a regression, and verifies the next versions."""
    route = batched.configure(partitions=4)
    events = Events()
    data_dir = batched.base_dir / "state"
    subjects = [f"acct-{i}" for i in range(12)]
    first = batched.start("first", data_dir=data_dir)
    batch1 = [events.clean(s, v) for v in (1, 2) for s in subjects]
    await produce(batched.bootstrap, route.input, batch1)
    await wait_caught_up(batched.bootstrap, batched.app_id, [route.input], workers=[first])
    assert first.stop() == 0, first.fail("did not stop cleanly").args[0]

    second = batched.start("second", data_dir=data_dir)
    regression = events.regression(subjects[0], 1)
    batch2 = [batch1[5], regression, *(events.clean(s, 3) for s in subjects)]
    await produce(batched.bootstrap, route.input, batch2)
    await wait_caught_up(batched.bootstrap, batched.app_id, [route.input], workers=[second])
    assert "restored" not in second.log_text(), "a clean restart must reuse the local state"

    verified = by_id(await collect(batched.bootstrap, route.verified, expected=len(batch1) + len(subjects)))
    quarantined = by_id(await collect(batched.bootstrap, route.quarantine, expected=1))
    assert all(len(r) == 1 for r in verified.values()), "a re-sent event was forwarded again"
    assert len(verified) == len(batch1) + len(subjects)
    assert set(quarantined) == {regression.event_id}
    assert "version.regression" in quarantined[regression.event_id][0].codes
    assert second.stop() == 0


async def _faust_runtime_left(factory: WorkerFactory, route: RouteNames, data_dir: Path,
                              records: list[Stamped]) -> None:
    """Leave `data_dir`, the changelogs and the app id's group as the faust agent runtime of earlier releases left
    them after it routed `records` (already in the input) and stopped cleanly: per table partition a RocksDB
    database in faust's layout (`<tabledir>/<route>-<table>-<partition>.db`, opened with faust's own
    RocksDBOptions) holding the state and, under faust's offset key, the offset of the last changelog record it
    holds; the changelog records; the input offsets committed by the group named as the app id."""
    assert factory.config_path is not None
    config = load(factory.config_path, environ=SECRETS)
    spec = config.routes[0]
    guard = Guard(config)
    tabledir = Path(faust.App(factory.app_id, datadir=str(data_dir), autodiscover=False, env={}).conf.tabledir)
    consumer = AIOKafkaConsumer(bootstrap_servers=factory.bootstrap, group_id=factory.app_id,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=factory.bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(route.input, p) for p in range(route.partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        inputs = []
        while len(inputs) < sum(ends.values()):
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                inputs.extend(batch)
        assert len(inputs) == len(records)
        now = time.time()
        for tp in tps:
            tables: dict[str, dict[bytes, bytes]] = {name: {} for name in TABLE_OF}
            for r in (r for r in inputs if r.partition == tp.partition):
                record = RecordIn(r.key, r.value, list(r.headers), r.topic, r.partition, r.offset, now)
                result = guard.process(record, spec, tables, now=now)
                assert result.first.decision.outcome.value == "verified"
                for (name, key), value in result.writes.items():
                    tables[name][key] = value  # type: ignore[assignment]
            for name in state_names(spec):
                last = -1
                for key, value in tables[name].items():
                    sent = await producer.send_and_wait(changelog_topic(factory.app_id, spec, name), value,
                                                        key=key, partition=tp.partition)
                    last = sent.offset
                db = RocksDBOptions(**STORE_OPTIONS).open(tabledir / f"{spec.name}-{TABLE_OF[name]}-{tp.partition}.db")
                for key, value in tables[name].items():
                    db.put(key, value)
                if last >= 0:
                    db.put(OFFSET_KEY, str(last).encode())  # as faust's Store.set_persisted_offset writes it
                db.close()
        await consumer.commit({tp: ends[tp] for tp in tps})  # the faust runtime's group: the app id
    finally:
        await producer.stop()
        await consumer.stop()


async def test_a_data_dir_and_group_of_the_faust_runtime_are_taken_over_as_they_are(
    worker_factory: WorkerFactory,
) -> None:
    """A data dir, changelogs and committed offsets as the faust agent runtime of earlier releases left them are
    taken over as they are: the local state is read without a restore (a re-sent event is a duplicate, an old
    version a regression) and the inputs resume where the app id's group committed (nothing processed twice)."""
    route = worker_factory.configure(partitions=2)
    assert worker_factory.config_path is not None
    data_dir = worker_factory.base_dir / "state"
    # The topics, changelogs included, as a worker creates them (no worker: its group would commit nothing yet).
    await provision(worker_factory.bootstrap, load(worker_factory.config_path, environ=SECRETS), worker_factory.app_id)
    events = Events()
    subjects = [f"acct-{i}" for i in range(12)]
    batch1 = [events.clean(s, v) for v in (1, 2) for s in subjects]
    await produce(worker_factory.bootstrap, route.input, batch1)
    await _faust_runtime_left(worker_factory, route, data_dir, batch1)

    new = worker_factory.start("batched", data_dir=data_dir)
    regression = events.regression(subjects[0], 1)
    batch2 = [batch1[5], regression, *(events.clean(s, 3) for s in subjects)]
    await produce(worker_factory.bootstrap, route.input, batch2)
    await wait_caught_up(worker_factory.bootstrap, worker_factory.app_id, [route.input], workers=[new])
    assert "restored" not in new.log_text(), "the faust runtime's local state must be read as it is"
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=len(subjects)))
    quarantined = by_id(await collect(worker_factory.bootstrap, route.quarantine, expected=1))
    assert all(len(r) == 1 for r in verified.values()), "an event was forwarded twice"
    assert set(verified) == {e.event_id for e in batch2[2:]}, "only the new versions pass"
    assert set(quarantined) == {regression.event_id}
    assert new.events_processed() == len(batch2), "the batched runtime processed the faust runtime's events again"
    assert new.stop() == 0


async def test_at_least_once_stores_no_state_of_a_batch_whose_outputs_were_not_delivered(
    batched: WorkerFactory,
) -> None:
    """Under at_least_once, when the verified topic refuses a batch's outputs, the worker stops loudly before it
    stores that batch's state or commits its offsets; restarted on the same data dir once the topic takes writes
    again, it verifies every event, none judged a duplicate of itself."""
    batched.processing_guarantee = "at_least_once"
    route = batched.configure(partitions=2)
    data_dir = batched.base_dir / "state"
    worker = batched.start("first", data_dir=data_dir)
    events = Events()
    before = [events.clean(f"early-{i}", 1) for i in range(20)]  # stored, with their changelog offsets
    await produce(batched.bootstrap, route.input, before)
    await wait_caught_up(batched.bootstrap, batched.app_id, [route.input], workers=[worker])
    await _set_limit(batched.bootstrap, route.verified, 200)
    clean = [events.clean(f"acct-{i}", 1) for i in range(400)]
    await produce(batched.bootstrap, route.input, clean)
    await _wait_for(lambda: not worker.alive(), 60)
    assert "were not delivered" in worker.log_text(), worker.fail("no word of the failed delivery").args[0]
    await _set_limit(batched.bootstrap, route.verified, 1_048_588 + OUTPUT_HEADROOM)

    again = batched.start("again", data_dir=data_dir)
    await wait_caught_up(batched.bootstrap, batched.app_id, [route.input], workers=[again], timeout=90)
    verified = by_id(await collect(batched.bootstrap, route.verified, expected=len(before) + len(clean)))
    verified.pop("probe", None)  # what _set_limit sent
    missing = sorted({s.event_id for s in clean} - set(verified))
    assert not missing, f"{len(missing)} events in no output: {missing[:5]}"
    assert again.stop() == 0


async def test_batched_runtime_sigkilled_mid_stream_loses_nothing(
    batched: WorkerFactory, capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGKILLed three times mid-stream (once restarted on a wiped data dir), the batched worker still routes every
    event: under at_least_once none is lost or wrongly quarantined (a repeat is allowed). The offsets are committed
    2 s apart, so the restart on a wiped data dir runs seconds of input again against a state that holds it: each
    such record is a duplicate of itself or forwarded again, never a version regression of itself. (Under
    exactly_once, each exactly once with its code: tests/chaos/test_crash.py, four SIGKILLs of the same runtime, two
    on a wiped data dir, with and without a repartition topic.)"""
    batched.processing_guarantee = "at_least_once"
    batched.commit_interval = 2.0
    rng = random.Random(20)
    route = batched.configure(partitions=4)
    bootstrap = batched.bootstrap
    events = Events()
    body = labeled_stream(rng, events)
    kills = 3
    after_kill = [payments(events, f"k{kill}-") for kill in range(1, kills + 1)]
    stream = merged([body, *after_kill])
    data_dir = batched.base_dir / "worker-data"
    worker = batched.start("run-0", data_dir=data_dir)
    feeding = asyncio.create_task(produce_paced(bootstrap, route.input, body.records, 30.0))
    recoveries = []
    try:
        await first_record_after(worker, time.monotonic())
        for kill in range(1, kills + 1):
            await asyncio.sleep(rng.uniform(1.5, 4.0))
            assert worker.alive(), worker.fail("died on its own").args[0]
            killed_at = time.monotonic()
            worker.kill()
            if kill == 2:
                wipe(data_dir)
            await produce_paced(bootstrap, route.input, after_kill[kill - 1].records, 0.0)
            worker = batched.start(f"run-{kill}", data_dir=data_dir, ready=False)
            recoveries.append(await first_record_after(worker, killed_at))
        await feeding
        await wait_caught_up(bootstrap, batched.app_id, [route.input], timeout=120, workers=[worker])
    finally:
        feeding.cancel()
    verified, quarantined = await _outputs(bootstrap, route, stream)
    assert worker.stop() == 0
    with capsys.disabled():
        print(f"\nbatched at_least_once: {len(stream.records)} records, {kills} SIGKILLs, next record routed "
              f"{', '.join(f'{s:.1f}' for s in recoveries)} s after each; {len(verified)} verified, "
              f"{len(quarantined)} quarantined")
    problems = _misrouted(stream, verified, quarantined, at_least_once=True)
    assert not problems, {what: ids[:5] for what, ids in problems.items()}


async def test_batched_workers_joining_and_leaving_mid_stream_route_each_event_once(
    batched: WorkerFactory, capsys: pytest.CaptureFixture[str],
) -> None:
    """Under exactly_once, a second worker joins while the stream flows and the first then leaves (SIGTERM): the
    partitions are handed over twice under load, and every event still ends in exactly one place."""
    rng = random.Random(7)
    route = batched.configure(partitions=4)
    bootstrap = batched.bootstrap
    stream = labeled_stream(rng, Events())
    a = batched.start("a")
    feeding = asyncio.create_task(produce_paced(bootstrap, route.input, stream.records, 25.0))
    try:
        await first_record_after(a, time.monotonic())
        await asyncio.sleep(4.0)
        b = batched.start("b")
        await asyncio.sleep(4.0)
        assert b.events_processed() > 0, b.fail("the joining worker got no partition").args[0]
        assert a.stop() == 0, a.fail("did not stop cleanly").args[0]
        await feeding
        await wait_caught_up(bootstrap, batched.app_id, [route.input], timeout=120, workers=[b])
    finally:
        feeding.cancel()
    verified, quarantined = await _outputs(bootstrap, route, stream)
    assert b.stop() == 0
    with capsys.disabled():
        print(f"\nbatched hand-over: {len(stream.records)} records, {len(verified)} verified, "
              f"{len(quarantined)} quarantined")
    problems = _misrouted(stream, verified, quarantined)
    assert not problems, {what: ids[:5] for what, ids in problems.items()}
    assert len(verified) + len(quarantined) == len(stream.records) - stream.duplicates



async def test_a_transaction_asks_for_its_commit_before_its_offsets_are_in_and_still_commits_them(
        kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """exactly_once (app/runtime/stages.py `begin`, `transact`) on aiokafka's real sender: the offsets join once
    the records are acknowledged (no produce beside AddOffsetsToTxn: a verifying broker answers it ~100 ms late);
    the commit is asked for right after, while the offsets' requests are on their way; the sender sends EndTxn only
    after them, and the group's offsets are those of the last transaction."""
    from itertools import groupby

    from aiokafka.producer import sender

    from app.runtime.batches import RecordBatches
    from app.runtime.stages import begin, transact, transactional_producer
    from bench.kafka import create_topics
    from tests.conftest import unique_name

    order: list[str] = []
    for handler in (sender.AddPartitionsToTxnHandler, sender.AddOffsetsToTxnHandler, sender.TxnOffsetCommitHandler,
                    sender.EndTxnHandler, sender.SendProduceReqHandler):
        made = handler.create_request

        def create_request(self: object, made: object = made, name: str = handler.__name__) -> object:
            order.append(name.removesuffix("Handler"))
            return made(self)  # type: ignore[operator]

        monkeypatch.setattr(handler, "create_request", create_request)
    topic = unique_name("txn-order", kafka_bootstrap)
    group = f"{topic}-group"
    await create_topics(kafka_bootstrap, [topic], 1)
    txn = transactional_producer(kafka_bootstrap, f"{topic}-txn", [topic], {})
    await txn.start()
    try:
        for offset in (1, 2, 3):
            await begin(txn)
            out = RecordBatches(txn)
            out.add(topic, 0, b"k", b"%d" % offset)
            await transact(txn, out, {TopicPartition(topic, 0): offset}, group)
    finally:
        await txn.stop()
    # (a request refused with CONCURRENT_TRANSACTIONS right after the EndTxn before it is sent again)
    assert [name for name, _ in groupby(order)] == [
        "AddPartitionsToTxn", "SendProduceReq", "AddOffsetsToTxn", "TxnOffsetCommit", "EndTxn"] * 3
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False,
                                isolation_level="read_committed", auto_offset_reset="earliest")
    await consumer.start()
    try:
        assert await consumer.committed(TopicPartition(topic, 0)) == 3
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek(TopicPartition(topic, 0), 0)
        got = await consumer.getmany(timeout_ms=5000)
        assert [m.value for m in got.get(TopicPartition(topic, 0), [])] == [b"1", b"2", b"3"]
    finally:
        await consumer.stop()
