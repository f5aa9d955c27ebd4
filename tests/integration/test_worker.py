"""The worker as a process on the real broker: where each record goes, state across restarts, and scaling out."""

from __future__ import annotations

import pytest

from byzguard.stamp import Stamped
from tests.integration.worker_harness import (
    Events,
    Out,
    WorkerFactory,
    WorkerProcess,
    by_id,
    collect,
    produce,
    wait_caught_up,
    wipe,
)

pytestmark = pytest.mark.kafka


def _own_headers(record: Out) -> list[tuple[str, bytes]]:
    """The producer's headers, without what byzguard added."""
    return [(k, v) for k, v in record.headers if not k.startswith("byzguard_")]


def _assert_once_each(outputs: list[Out], ids: set[str], where: str) -> dict[str, Out]:
    """Every id exactly once in `outputs` and nothing else; returns the records by id."""
    counts = by_id(outputs)
    assert set(counts) == ids, (f"{where}: missing {sorted(ids - set(counts))}, "
                                f"unexpected {sorted(set(counts) - ids)}")
    twice = sorted(i for i, records in counts.items() if len(records) > 1)
    assert not twice, f"{where}: more than once: {twice}"
    return {i: records[0] for i, records in counts.items()}


async def _run_batch(factory: WorkerFactory, records: list[Stamped], *workers: WorkerProcess) -> None:
    """Produce `records` and wait until the group has committed them (so their outputs are readable)."""
    assert factory.route is not None
    await produce(factory.bootstrap, factory.route.input, records)
    await wait_caught_up(factory.bootstrap, factory.app_id, [factory.route.input], workers=workers)


async def test_routes_each_record_to_exactly_one_destination_with_its_bytes_untouched(
    worker_factory: WorkerFactory,
) -> None:
    """Clean events reach the verified topic with their key, value and headers plus byzguard_verdict=pass; corrupted,
    regressed, forged and malformed ones reach the quarantine topic byte for byte with their reasons, quarantine id and
    original coordinates; a duplicate reaches neither; every output keeps its input's partition."""
    route = worker_factory.configure(partitions=4)
    worker = worker_factory.start("w1")
    events = Events()
    clean = [events.clean(f"order-{i}", 1) for i in range(8)] + [events.payment("pay-1", 1)]
    clean += [events.clean(f"order-{i}", 2) for i in range(8)]
    bad = {
        "integrity.mismatch": events.corrupted("order-0", 3),
        "version.regression": events.regression("order-1", 1),
        "source.forged": events.forged("pay-1", 2),
        "decode.malformed": events.malformed("order-2"),
    }
    duplicate = clean[12]
    await _run_batch(worker_factory, [*clean, *bad.values(), duplicate], worker)

    bootstrap = worker_factory.bootstrap
    inputs = await collect(bootstrap, route.input, expected=len(clean) + len(bad) + 1,
                           isolation_level="read_uncommitted")
    first_input = {}
    for record in sorted(inputs, key=lambda r: r.offset):
        first_input.setdefault(record.event_id, record)
    verified = _assert_once_each(await collect(bootstrap, route.verified, expected=len(clean)),
                                 {s.event_id for s in clean}, "verified")
    quarantined = _assert_once_each(await collect(bootstrap, route.quarantine, expected=len(bad)),
                                    {s.event_id for s in bad.values()}, "quarantine")

    for event_id, out in verified.items():
        original = first_input[event_id]
        assert (out.key, out.value, out.partition) == (original.key, original.value, original.partition)
        assert _own_headers(out) == original.headers
        assert out.header("byzguard_verdict") == b"pass"
        assert out.header("byzguard_route") == b"orders"
    for code, sent in bad.items():
        out, original = quarantined[sent.event_id], first_input[sent.event_id]
        assert (out.key, out.value, out.partition) == (original.key, original.value, original.partition)
        assert _own_headers(out) == original.headers
        assert code in out.codes, f"{sent.event_id}: {out.reasons}"
        assert all({"check", "code", "detail"} <= set(reason) for reason in out.reasons)
        assert out.header("byzguard_verdict") == b"reject"
        assert out.header("byzguard_quarantine_id") == f"{route.input}-{original.partition}-{original.offset}".encode()
        assert out.header("byzguard_original_topic") == route.input.encode()
        assert out.header("byzguard_original_partition") == str(original.partition).encode()
        assert out.header("byzguard_original_offset") == str(original.offset).encode()
        assert out.header("byzguard_original_timestamp") == f"{original.timestamp / 1000:.3f}".encode()


async def test_state_survives_restarts_on_the_same_and_on_a_wiped_data_dir(worker_factory: WorkerFactory) -> None:
    """Restarted on its data dir, and then on an empty one (state only from the changelogs), the worker verifies
    higher versions with no false regression and still quarantines an old version as version.regression and drops a
    re-sent event as a duplicate."""
    route = worker_factory.configure(partitions=4)
    events = Events()
    subjects = [f"acct-{i}" for i in range(12)]
    data_dir = worker_factory.base_dir / "state"

    first = worker_factory.start("first", data_dir=data_dir)
    batch1 = [events.clean(s, v) for v in (1, 2, 3) for s in subjects]
    await _run_batch(worker_factory, batch1, first)
    assert first.stop() == 0, first.fail("did not stop cleanly").args[0]

    same_dir = worker_factory.start("same-dir", data_dir=data_dir)
    batch2 = [events.clean(s, v) for v in (4, 5) for s in subjects]
    regressions = [events.regression(subjects[0], 2), events.regression(subjects[5], 3)]
    await _run_batch(worker_factory, batch2 + regressions, same_dir)
    assert same_dir.stop() == 0, same_dir.fail("did not stop cleanly").args[0]

    wipe(data_dir)
    wiped = worker_factory.start("wiped-dir", data_dir=data_dir)
    batch3 = [events.clean(s, 6) for s in subjects]
    regressions.append(events.regression(subjects[1], 4))
    resent = batch2[0]  # acct-0 version 4, again
    await _run_batch(worker_factory, [*batch3, regressions[-1], resent], wiped)

    clean = batch1 + batch2 + batch3
    verified = _assert_once_each(await collect(worker_factory.bootstrap, route.verified, expected=len(clean)),
                                 {s.event_id for s in clean}, "verified")
    quarantined = _assert_once_each(
        await collect(worker_factory.bootstrap, route.quarantine, expected=len(regressions)),
        {s.event_id for s in regressions}, "quarantine")
    warned = {i: out.reasons for i, out in verified.items() if out.header("byzguard_verdict") != b"pass"}
    assert not warned, f"verified with reasons (state lost?): {warned}"
    assert all(out.codes == {"version.regression"} for out in quarantined.values()), quarantined


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_second_worker_shares_partitions_and_takes_over_when_the_first_stops(
    worker_factory: WorkerFactory, guarantee: str,
) -> None:
    """Two workers of one group on 4 partitions both process records; when one stops, the other takes its partitions
    over with their state from the changelogs: higher versions pass, old versions are still caught, and every record
    ends in one place once (under at_least_once too: these rebalances are orderly, nothing is redelivered)."""
    worker_factory.processing_guarantee = guarantee
    route = worker_factory.configure(partitions=4)
    events = Events()
    subjects = [f"item-{i}" for i in range(24)]

    a = worker_factory.start("a")
    batch1 = [events.clean(s, v) for v in (1, 2) for s in subjects]
    await _run_batch(worker_factory, batch1, a)
    inputs = await collect(worker_factory.bootstrap, route.input, expected=len(batch1),
                           isolation_level="read_uncommitted")
    partition_of = {r.key.decode(): r.partition for r in inputs if r.key is not None}
    assert set(partition_of.values()) == {0, 1, 2, 3}, "the entities must cover every partition"

    b = worker_factory.start("b")
    a_before = a.events_processed()
    batch2 = [events.clean(s, 3) for s in subjects]
    await _run_batch(worker_factory, batch2, a, b)
    assert a.events_processed() > a_before, "the first worker kept no partition"
    assert b.events_processed() > 0, "the second worker got no partition"

    assert a.stop() == 0, a.fail("did not stop cleanly").args[0]
    b_before = b.events_processed()
    one_per_partition = {p: s for s, p in sorted(partition_of.items(), reverse=True)}
    batch3 = [events.clean(s, 4) for s in subjects]
    regressions = [events.regression(s, 2) for s in one_per_partition.values()]
    await _run_batch(worker_factory, batch3 + regressions, b)
    assert b.events_processed() - b_before == len(batch3) + len(regressions), "b must route all of batch 3, once"

    clean = batch1 + batch2 + batch3
    verified = _assert_once_each(await collect(worker_factory.bootstrap, route.verified, expected=len(clean)),
                                 {s.event_id for s in clean}, "verified")
    quarantined = _assert_once_each(
        await collect(worker_factory.bootstrap, route.quarantine, expected=len(regressions)),
        {s.event_id for s in regressions}, "quarantine")
    assert all(out.header("byzguard_verdict") == b"pass" for out in verified.values())
    assert all(out.codes == {"version.regression"} for out in quarantined.values()), quarantined
