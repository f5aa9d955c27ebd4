"""Poison pills on the real broker: records the broker accepts but whose copy, state or receipt would be too large
never crash the worker and are never lost; a record whose copy cannot be written at all is quarantined as a bounded
stub that points at the original; the review CLI lists and shows a stub."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from collections.abc import Callable

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import MessageSizeTooLargeError

from app.provision import OUTPUT_HEADROOM
from app.runtime.limits import load_limits
from tests.integration.worker_harness import (
    REPO,
    TEST_ID,
    Events,
    Out,
    WorkerFactory,
    WorkerProcess,
    by_id,
    collect,
    input_group,
    produce,
    wait_caught_up,
)

pytestmark = pytest.mark.kafka

GARBAGE_SIZE = 1_048_400  # the broker's default limit (1,048,588) minus a record batch's overhead, about


async def _send_raw(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
                    *, partition: int = 0, compression: str | None = None) -> None:
    """Send records as a producer byzguard did not write would (one partition, any bytes)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 << 20, compression_type=compression,
                                acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topic, value, key=key, headers=headers, partition=partition)
    finally:
        await producer.stop()


async def _settle(factory: WorkerFactory, worker: WorkerProcess) -> None:
    assert factory.route is not None
    await wait_caught_up(factory.bootstrap, factory.app_id, [factory.route.input], workers=[worker], timeout=90)
    assert worker.alive(), worker.fail("stopped")
    assert "Traceback" not in worker.log_text(), worker.fail("logged a traceback")


def _cli(worker: WorkerProcess, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**worker.env, "COLUMNS": "200", "BYZGUARD_REVIEWER": "carol"}
    done = subprocess.run([sys.executable, "-m", "app.cli", "quarantine", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == code, \
        f"`quarantine {' '.join(args)}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


async def test_a_garbage_record_at_the_brokers_limit_is_quarantined_whole_and_the_worker_goes_on(
        worker_factory: WorkerFactory) -> None:
    """A 1,048,400-byte garbage record is quarantined byte for byte (the quarantine topic has room for byzguard's
    headers above the input's limit), the next clean event is verified, and the worker never stops."""
    route = worker_factory.configure(partitions=1)
    worker = worker_factory.start("w1")
    garbage = bytes(range(256)) * (GARBAGE_SIZE // 256) + b"\x00" * (GARBAGE_SIZE % 256)
    await _send_raw(worker_factory.bootstrap, route.input, [(b"junk", garbage, [(TEST_ID, b"garbage-1")])])
    events = Events()
    clean = events.clean("order-1", 1)
    await produce(worker_factory.bootstrap, route.input, [clean])
    await _settle(worker_factory, worker)

    quarantined = by_id(await collect(worker_factory.bootstrap, route.quarantine, expected=1))
    assert list(quarantined) == ["garbage-1"]
    (out,) = quarantined["garbage-1"]
    assert out.value == garbage and out.key == b"junk"
    assert out.header("byzguard_original_offset") == b"0"
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=1))
    assert list(verified) == [clean.event_id]
    limits = await load_limits(worker_factory.bootstrap, [route.input, route.quarantine, route.verified])
    assert limits[route.quarantine] > limits[route.input] and limits[route.verified] > limits[route.input]


async def test_a_record_whose_copy_cannot_fit_is_quarantined_as_a_stub_that_the_review_cli_lists_and_shows(
        worker_factory: WorkerFactory) -> None:
    """A 3 MB record the input took compressed cannot be copied uncompressed: a bounded stub with output.too_large,
    the original's coordinates, size and SHA-256 goes to quarantine, it changes no state, and `quarantine list`
    and `show` print it; approving it is refused."""
    route = worker_factory.configure(partitions=1)
    worker = worker_factory.start("w1")
    big = b'{"pad": "' + b"a" * 3_000_000 + b'"}'
    events = Events()
    signed = events.orders.binary(big, type="order.confirmed", subject="order-9", version=1, time=time.time(),
                                  event_id="big-order-9")
    await _send_raw(worker_factory.bootstrap, route.input, [(signed.key, signed.value, signed.headers)],
                    compression="gzip")
    after = events.clean("order-9", 1)  # the same entity and version: verified, so the stub changed no state
    await produce(worker_factory.bootstrap, route.input, [after])
    await _settle(worker_factory, worker)

    quarantined = await collect(worker_factory.bootstrap, route.quarantine, expected=1)
    assert len(quarantined) == 1
    stub: Out = quarantined[0]
    assert stub.codes == {"output.too_large"} and stub.header("byzguard_stub") == b"output.too_large"
    body = orjson.loads(stub.value or b"")
    assert (body["topic"], body["partition"], body["offset"]) == (route.input, 0, 0)
    assert body["value_size"] == len(big) and body["value_sha256"] == hashlib.sha256(big).hexdigest()
    assert len(stub.value or b"") < 2000 and stub.header("ce_id") == b"big-order-9"
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=1))
    assert list(verified) == [after.event_id]
    assert verified[after.event_id][0].header("byzguard_verdict") == b"pass"

    qid = f"{route.input}-0-0"
    listed = orjson.loads(_cli(worker, "list", "--json").stdout)
    assert [r["quarantine_id"] for r in listed["records"]] == [qid]
    shown = orjson.loads(_cli(worker, "show", qid, "--json", "--no-entity-state").stdout)
    assert shown["reasons"][0]["code"] == "output.too_large"
    assert "output.too_large" in _cli(worker, "show", qid, "--no-entity-state").stdout
    assert "output.too_large" in _cli(worker, "list").stdout
    refused = orjson.loads(_cli(worker, "approve", qid, "--json", code=1).stdout)
    assert refused["applied"] == [] and "stub" in refused["refused"][0]["why"]


async def test_a_valid_600kb_event_is_verified_once_and_its_identical_resend_is_a_duplicate(
        worker_factory: WorkerFactory) -> None:
    """A signed event of 600 KB is verified, its state reaches the changelog, and a byte-identical re-send after a
    restart on a wiped data dir (state only from the changelog) is dropped as a duplicate; the worker never stops."""
    route = worker_factory.configure(partitions=1)
    worker = worker_factory.start("w1")
    events = Events()
    notes = "\u00e9" * 300_000  # 600 KB of UTF-8; the entity's state keeps it beside its bookkeeping: over 1 MB
    big = events.orders.binary({"order": "order-1", "version": 1, "notes": notes}, type="order.confirmed",
                               subject="order-1", version=1, time=time.time(), event_id="big-1")
    await produce(worker_factory.bootstrap, route.input, [big])
    await _settle(worker_factory, worker)
    assert worker.stop() == 0
    changelog_name = f"{worker_factory.app_id}-orders-state_by_entity-changelog"
    changelog = await collect(worker_factory.bootstrap, changelog_name, expected=1)
    assert [r.key for r in changelog] == [b"order-1"], "the entity's state is in its changelog"
    limits = await load_limits(worker_factory.bootstrap, [route.input, changelog_name])
    assert limits[changelog_name] >= 2 * limits[route.input], "changelogs are created with room for such state"

    again = worker_factory.start("w2")  # its own, empty data dir: state comes from the changelog
    await produce(worker_factory.bootstrap, route.input, [big])
    await _settle(worker_factory, again)
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=1))
    assert {i: len(v) for i, v in verified.items()} == {"big-1": 1}
    assert await collect(worker_factory.bootstrap, route.quarantine, idle=1.0) == []


async def test_one_value_sent_as_twelve_new_versions_under_100kb_ids_never_stops_the_worker(
        worker_factory: WorkerFactory) -> None:
    """One value sent as twelve new versions of its entity under new 100 KB ids is verified each time (the entity
    remembers every id: over 1 MB of state), its receipts are keyed by the SHA-256 of the id (bounded), and the
    worker never stops."""
    route = worker_factory.configure(partitions=1)
    assert worker_factory.config_path is not None
    receipts = f"{route.input}-receipts"
    text = worker_factory.config_path.read_text()
    worker_factory.config_path.write_text(text.replace(f"    partitions: {route.partitions}\n",
                                                       f"    partitions: {route.partitions}\n"
                                                       f"    receipts_topic: {receipts}\n"))
    worker = worker_factory.start("w1")
    events = Events()
    first = events.clean("order-5", 1)
    data = orjson.loads(first.value)
    again = [events.orders.binary(data, type="order.confirmed", subject="order-5", version=n, time=time.time(),
                                  event_id=f"{n:02d}-" + "i" * 100_000) for n in range(2, 14)]
    await produce(worker_factory.bootstrap, route.input, [first, *again])
    await _settle(worker_factory, worker)

    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=13))
    assert set(verified) == {s.event_id for s in [first, *again]} and all(len(v) == 1 for v in verified.values())
    got = await collect(worker_factory.bootstrap, receipts, expected=13)
    keys = {r.key for r in got}
    assert keys == {s.key_id_bytes for s in [first, *again]} and all(len(k or b"") <= 256 for k in keys)
    assert all(len(r.value or b"") < 12_000 for r in got)


async def _set_limit(bootstrap: str, topic: str, limit: int) -> None:
    """Set `topic`'s max.message.bytes (under a running worker: it measured the limit at start, so what it sends
    then is refused by the broker, as after an operator's mistake)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(limit)})])
    finally:
        await admin.close()
    # The broker applies a topic's config change asynchronously: wait until a record just over the limit is refused.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=16 << 20)
    await producer.start()
    try:
        probe = b"p" * min(limit, 1000)  # refused under a small limit; taken under a large one
        for _ in range(100):
            try:
                await producer.send_and_wait(topic, probe, headers=[(TEST_ID, b"probe")], partition=0)
                refused = False
            except MessageSizeTooLargeError:
                refused = True
            if refused == (len(probe) >= limit):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"{topic}: max.message.bytes={limit} did not apply")
    finally:
        await producer.stop()


async def _wait_for(what: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not what() and time.monotonic() < deadline:  # noqa: ASYNC110  (a process's state, no event to wait on)
        await asyncio.sleep(0.2)


async def test_at_least_once_never_stores_state_before_the_outputs_are_delivered(
        worker_factory: WorkerFactory) -> None:
    """Under at_least_once, when the verified topic refuses the outputs of events already processed (and written out
    mid-interval), the worker is SIGKILLed and restarted on the same data dir once the topic takes writes again: it
    verifies every event, none is judged a duplicate of itself because its state was stored undelivered.

    The batched runtime stores a batch only after its outputs are delivered, so it stops at the first undelivered
    batch (and its later events are not processed at all)."""
    worker_factory.processing_guarantee = "at_least_once"
    worker_factory.commit_interval = 5.0  # every event is processed (and its state written out) before a commit
    route = worker_factory.configure(partitions=2)
    data_dir = worker_factory.base_dir / "state"
    worker = worker_factory.start("first", data_dir=data_dir)
    await _set_limit(worker_factory.bootstrap, route.verified, 200)
    events = Events()
    clean = [events.clean(f"acct-{i}", 1) for i in range(400)]  # 800 state keys: written out mid-interval
    await produce(worker_factory.bootstrap, route.input, clean)
    # Its first batch is not delivered: nothing of it is stored, and the worker stops.
    await _wait_for(lambda: not worker.alive(), 60)
    assert not worker.alive(), worker.fail("kept running after its outputs were refused")
    assert "were not delivered" in worker.log_text(), worker.fail("no word of the failed delivery")
    worker.kill()
    await _set_limit(worker_factory.bootstrap, route.verified, 1_048_588 + OUTPUT_HEADROOM)

    again = worker_factory.start("again", data_dir=data_dir)
    await _settle(worker_factory, again)
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=len(clean)))
    verified.pop("probe", None)  # what _set_limit sent
    missing = sorted({s.event_id for s in clean} - set(verified))
    assert not missing, f"{len(missing)} acknowledged events in no output: {missing[:5]}"


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_a_topic_that_cannot_take_writes_stops_the_worker_and_nothing_is_committed_past_them(
        worker_factory: WorkerFactory, guarantee: str) -> None:
    """A send that fails (the verified topic's limit was lowered under the worker) is never skipped: the worker
    stops loudly, the group commits no offset past the undelivered events, and a restarted worker delivers every
    one once the topic takes them again."""
    worker_factory.processing_guarantee = guarantee
    route = worker_factory.configure(partitions=2)
    worker = worker_factory.start("w1")
    await _set_limit(worker_factory.bootstrap, route.verified, 200)
    events = Events()
    clean = [events.clean(f"acct-{i}", 1) for i in range(200)]
    await produce(worker_factory.bootstrap, route.input, clean)
    await _wait_for(lambda: not worker.alive(), 60)
    assert not worker.alive(), worker.fail("kept running after its outputs were refused")
    admin = AIOKafkaAdminClient(bootstrap_servers=worker_factory.bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(input_group(worker_factory.app_id))
    finally:
        await admin.close()
    assert sum(max(0, c.offset) for c in committed.values()) < len(clean), committed
    await _set_limit(worker_factory.bootstrap, route.verified, 1_048_588 + OUTPUT_HEADROOM)
    again = worker_factory.start("again")
    await _settle(worker_factory, again)
    verified = by_id(await collect(worker_factory.bootstrap, route.verified, expected=len(clean)))
    verified.pop("probe", None)  # what _set_limit sent
    assert set(verified) == {s.event_id for s in clean}
    assert "were not delivered" in worker.log_text()
