"""A worker restarted on its data dir after a SIGKILL, on the real broker (batched runtime): it takes its partitions
back at once instead of waiting for the dead process's session to time out; a clean stop still hands its
partitions over at once (app/runtime/membership.py). A data dir that last stored longer ago than its changelogs keep
tombstones is restored from the beginning, a recent one brought forward (app/runtime/state.py, issue 20)."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.stores.rocksdb import RocksDBOptions

from app.runtime.state import STORED_AT_KEY, db_path
from byzguard.config import load
from byzguard.guard import ENTITIES
from tables import store_options
from tests.integration.worker_harness import (
    SECRETS,
    Events,
    WorkerFactory,
    WorkerProcess,
    by_id,
    collect,
    input_group,
    produce,
    wait_caught_up,
    wipe,
)

pytestmark = pytest.mark.kafka

#: Far longer than a restart takes: a worker that waited for the dead process's session would fail the test.
SESSION_TIMEOUT = 60.0


def _worker(factory: WorkerFactory, name: str, *, worker_id: str | None = None, port: int | None = None,
            **kwargs: object) -> WorkerProcess:
    """A started batched worker whose group session times out only after SESSION_TIMEOUT; `worker_id`: its
    BYZGUARD_WORKER_ID, `port`: its web port (its URL) instead of a free one."""
    worker = factory.new_worker(name, **kwargs)  # type: ignore[arg-type]
    worker.env["BYZGUARD_SESSION_TIMEOUT"] = str(SESSION_TIMEOUT)
    if worker_id is not None:
        worker.env["BYZGUARD_WORKER_ID"] = worker_id
    if port is not None:
        worker.env["BYZGUARD_WEB_PORT"] = str(port)
        worker.web_port = port
    worker.start()
    return worker


async def _first_worker_caught_up(worker_factory: WorkerFactory, guarantee: str, **options: Any,
                                  ) -> tuple[Any, Events, WorkerProcess, list[Any]]:
    """A worker under `guarantee` on a route of 4 partitions, caught up with one clean event of 40 entities."""
    worker_factory.processing_guarantee = guarantee
    route = worker_factory.configure(partitions=4)
    events = Events()
    first = _worker(worker_factory, "first", **options)
    first.wait_ready(90)
    before = [events.clean(f"acct-{i}", 1) for i in range(40)]
    await produce(worker_factory.bootstrap, route.input, before)
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input],
                         workers=[first])
    return route, events, first, before


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_a_worker_restarted_after_a_sigkill_takes_its_partitions_back_without_the_session_timeout(
        worker_factory: WorkerFactory, guarantee: str) -> None:
    """A worker SIGKILLed and restarted at once on the same data dir removes the member its dead process left in the
    groups and routes again well before that member's session would have timed out, losing nothing."""
    route, events, first, before = await _first_worker_caught_up(worker_factory, guarantee)
    first.kill()
    killed = time.monotonic()
    again = _worker(worker_factory, "again", data_dir=first.data_dir)
    after = [events.clean(f"acct-{i}", 2) for i in range(40)]
    await produce(worker_factory.bootstrap, route.input, after)
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input],
                         workers=[again], timeout=SESSION_TIMEOUT - 15)
    took = time.monotonic() - killed
    assert took < SESSION_TIMEOUT - 15, took
    log = again.log_text()
    assert "a previous process of this worker left behind" in log and "removed 1 member(s)" in log, \
        again.fail("did not remove the dead process's member")
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=len(before) + len(after)))
    assert set(verified) == {s.event_id for s in before + after}


async def test_a_cleanly_stopped_worker_hands_its_partitions_over_at_once(worker_factory: WorkerFactory) -> None:
    """With two workers, the one stopped cleanly (SIGTERM) leaves the group: the other takes all its partitions and
    routes what comes next well before a session timeout, and the restarted one finds no member to remove."""
    route = worker_factory.configure(partitions=4)
    events = Events()
    one, two = _worker(worker_factory, "one"), _worker(worker_factory, "two")
    one.wait_ready(90)
    two.wait_ready(90)
    assert one.stop() == 0
    stopped = time.monotonic()
    batch = [events.clean(f"acct-{i}", 1) for i in range(40)]
    await produce(worker_factory.bootstrap, route.input, batch)
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input],
                         workers=[two], timeout=SESSION_TIMEOUT - 15)
    assert time.monotonic() - stopped < SESSION_TIMEOUT - 15
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=len(batch)))
    assert set(verified) == {s.event_id for s in batch}
    back = _worker(worker_factory, "back", data_dir=one.data_dir)
    back.wait_ready(90)
    assert "left behind" not in back.log_text(), back.fail("removed a member although the last process left")


async def _restarted_on_a_wiped_data_dir(worker_factory: WorkerFactory, guarantee: str, worker_id: str | None,
                                         recognised: str) -> None:
    """SIGKILL a caught-up worker, wipe its data dir and restart it at the same web port (under `worker_id`, if
    any): it must route again well before the dead members' session would have timed out, having logged
    `recognised` and removed the dead member, with every event verified once (its state comes back from the
    changelogs). Prints the time from the SIGKILL to the first routed record."""
    route, events, first, before = await _first_worker_caught_up(worker_factory, guarantee, worker_id=worker_id)
    first.kill()
    killed = time.monotonic()
    wipe(first.data_dir)
    again = _worker(worker_factory, "again", worker_id=worker_id, port=first.web_port, data_dir=first.data_dir)
    after = [events.clean(f"acct-{i}", 2) for i in range(40)]
    await produce(worker_factory.bootstrap, route.input, after[:1])
    await collect(worker_factory.bootstrap, route.verified, expected=len(before) + 1, idle=0.0,
                  timeout=SESSION_TIMEOUT - 15)
    print(f"\n{guarantee}, worker id {worker_id}: SIGKILL -> first routed record on a wiped data dir: "
          f"{time.monotonic() - killed:.1f} s")
    await produce(worker_factory.bootstrap, route.input, after[1:])
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input],
                         workers=[again], timeout=SESSION_TIMEOUT - 15)
    assert time.monotonic() - killed < SESSION_TIMEOUT - 15
    log = again.log_text()
    assert recognised in log and "removed 1 member(s)" in log, again.fail("did not remove the dead process's member")
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=len(before) + len(after)))
    assert set(verified) == {s.event_id for s in before + after}
    assert all(len(records) == 1 for records in verified.values())


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
async def test_a_named_worker_restarted_on_a_wiped_data_dir_takes_its_partitions_back_without_the_session_timeout(
        worker_factory: WorkerFactory, guarantee: str) -> None:
    """A worker with BYZGUARD_WORKER_ID, SIGKILLed and restarted under the same name and URL on a wiped data dir,
    recognises its dead process's members by that name and removes them: it routes again well before their session
    would have timed out, and its state comes back from the changelogs (the next versions are verified, none
    lost)."""
    await _restarted_on_a_wiped_data_dir(worker_factory, guarantee, "guard-0",
                                         "a previous process of this worker left behind")


async def _both_share_the_partitions(worker_factory: WorkerFactory, route: Any, one: WorkerProcess,
                                     two: WorkerProcess) -> None:
    """40 clean events are worked through by the two workers together, and both stay alive."""
    events = Events()
    batch = [events.clean(f"acct-{i}", 1) for i in range(40)]
    await produce(worker_factory.bootstrap, route.input, batch)
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input],
                         workers=[one, two])
    assert one.alive() and two.alive()


async def test_two_live_workers_given_one_name_do_not_remove_each_other(worker_factory: WorkerFactory) -> None:
    """A second worker started with the BYZGUARD_WORKER_ID of a live one, at another URL (another port), finds a
    member of that name serving another URL: it removes nothing, says the names must be unique, and both share
    the partitions."""
    route = worker_factory.configure(partitions=4)
    one = _worker(worker_factory, "one", worker_id="guard-0")
    one.wait_ready(90)
    two = _worker(worker_factory, "two", worker_id="guard-0")
    two.wait_ready(90)
    log = two.log_text()
    assert "another live worker has this BYZGUARD_WORKER_ID" in log, two.fail("did not see the other live worker")
    assert "left behind" not in log, two.fail("removed a live worker's member")
    await _both_share_the_partitions(worker_factory, route, one, two)


async def test_a_worker_restarted_on_a_wiped_data_dir_at_its_address_and_url_takes_its_partitions_back(
        worker_factory: WorkerFactory) -> None:
    """A worker without BYZGUARD_WORKER_ID, SIGKILLed and restarted on a wiped data dir on the same host and web port
    (so the same URL), recognises its dead process's members by that address and URL and removes them: it routes
    again well before their session would have timed out, losing nothing."""
    await _restarted_on_a_wiped_data_dir(worker_factory, "exactly_once", None, "connected from this worker's address")


async def test_live_workers_on_one_host_do_not_remove_each_other_by_address(worker_factory: WorkerFactory) -> None:
    """Two workers without BYZGUARD_WORKER_ID on one host (one address) at two web ports remove nothing of each
    other; a third started at the first one's port (which it cannot serve) removes nothing of the first either,
    and the two go on sharing the partitions."""
    route = worker_factory.configure(partitions=4)
    one = _worker(worker_factory, "one")
    one.wait_ready(90)
    two = _worker(worker_factory, "two")
    two.wait_ready(90)
    assert "left behind" not in two.log_text() and "this worker's address" not in two.log_text(), \
        two.fail("took the other live worker for a previous process")
    three = _worker(worker_factory, "three", port=one.web_port)
    for _ in range(300):  # its takeover runs within a minute; then it joins the group
        if "batched runtime: assigned" in three.log_text() or not three.alive():
            break
        await asyncio.sleep(0.2)
    log = three.log_text()
    assert "cannot be bound here" in log and "left behind" not in log, three.fail("removed a live worker's member")
    # It cannot serve its URL: it leaves, or has exited. (Stopped while it still joins the group, it would hang until
    # it is killed after 60 s, and its member would hold partitions until its session timed out.)
    three.stop(must_stop=False)
    await _both_share_the_partitions(worker_factory, route, one, two)
    assert "left behind" not in one.log_text() + two.log_text()


async def test_a_worker_stopped_while_it_joins_the_group_stops(worker_factory: WorkerFactory) -> None:
    """SIGTERM while the worker's join is pending: its stop lets the join end, opens nothing, leaves the group and
    exits cleanly. (Its stop held the runtime's lock while aiokafka's stop waited for the join, whose assignment
    listener waited for that lock: the worker hung until it was killed, its member holding partitions.)"""
    session = 8.0
    worker_factory.configure(partitions=4)

    def started(name: str) -> WorkerProcess:
        worker = worker_factory.new_worker(name)
        worker.env["BYZGUARD_SESSION_TIMEOUT"] = str(session)
        worker.start()
        return worker

    one = started("one")
    one.wait_ready(90)
    one.send(signal.SIGSTOP)  # a member that does not rejoin: the next join waits for its session to time out
    try:
        two = started("two")
        for _ in range(300):
            if re.search(r"batched runtime: \w+, group", two.log_text()) or not two.alive():
                break
            await asyncio.sleep(0.1)
        assert "batched runtime: assigned" not in two.log_text(), "joined before the stop: the test proves nothing"
        assert two.alive(), two.fail("exited before the stop")
        stopping = time.monotonic()
        assert two.stop(3 * session + 20) == 0
        assert time.monotonic() - stopping < 3 * session + 20
        assert "batched runtime: assigned" not in two.log_text(), two.fail("opened partitions while it stopped")
    finally:
        one.send(signal.SIGCONT)


def _edit_entities(factory: WorkerFactory, data_dir: Path, *, ghost: bool = False,
                   stored_at: int | None = None) -> bool:
    """Open partition 0's state_by_entity database of a stopped worker: add a key its changelog does not hold (what
    a delete whose tombstone compaction removed would leave behind: `ghost`), or set the time of its last store;
    returns whether the ghost key is there."""
    assert factory.config_path is not None
    route = load(factory.config_path, environ=SECRETS).routes[0]
    tabledir = Path(faust.App(factory.app_id, datadir=str(data_dir), autodiscover=False, env={}).conf.tabledir)
    db = RocksDBOptions(**store_options(write_buffer_mb=8, block_cache_mb=8)).open(db_path(tabledir, route,
                                                                                          ENTITIES, 0))
    try:
        if ghost:
            key = next(k for k, _ in db.items() if not k.startswith(b"__"))
            db[b"ghost-" + key] = db[key]
        if stored_at is not None:
            db[STORED_AT_KEY] = str(stored_at).encode()
        return any(k.startswith(b"ghost-") for k, _ in db.items())
    finally:
        db.close()


async def test_a_data_dir_older_than_its_changelogs_keep_tombstones_is_restored_from_the_beginning(
        worker_factory: WorkerFactory) -> None:
    """Issue 20: compaction removes a tombstone once it is delete.retention.ms old (24 h here, the default), so a
    data dir that last stored longer ago may never see a delete written after its offset. A worker restarted on a
    data dir that stored moments ago brings it forward from its offset (a key its changelog does not hold stays);
    restarted on one that last stored 48 h ago, it wipes it with a WARNING and restores it from the changelog's
    beginning (that key is gone), and routes on as before: a re-sent event is still a duplicate."""
    route = worker_factory.configure(partitions=1)
    events = Events()
    data_dir = worker_factory.base_dir / "state"
    first = worker_factory.start("first", data_dir=data_dir)
    before = [events.clean(f"acct-{i}", 1) for i in range(10)]
    await produce(worker_factory.bootstrap, route.input, before)
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input],
                         workers=[first])
    assert first.stop() == 0
    assert _edit_entities(worker_factory, data_dir, ghost=True)

    recent = worker_factory.start("recent", data_dir=data_dir)
    assert recent.stop() == 0
    assert "delete.retention.ms" not in recent.log_text(), recent.fail("a recent data dir was discarded")
    assert _edit_entities(worker_factory, data_dir), "a recent data dir is brought forward, not wiped"

    _edit_entities(worker_factory, data_dir, stored_at=int(time.time() * 1000) - 48 * 3_600_000)
    aged = worker_factory.start("aged", data_dir=data_dir)
    log = aged.log_text()
    assert "WARNING" in log and "more than 0.5 of the changelog's delete.retention.ms (86400000 ms)" in log, \
        aged.fail("an aged data dir was not discarded")
    after = [before[0], events.clean("acct-1", 2)]
    await produce(worker_factory.bootstrap, route.input, after)
    await wait_caught_up(worker_factory.bootstrap, input_group(worker_factory.app_id), [route.input],
                         workers=[aged])
    assert aged.stop() == 0
    assert not _edit_entities(worker_factory, data_dir), "the aged data dir was restored from the beginning"
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=len(before) + 1))
    assert set(verified) == {s.event_id for s in [*before, after[1]]}
    assert all(len(records) == 1 for records in verified.values()), "a re-sent event went through again"
