"""Quarantine review and replay on the real broker: the store, the CLI, a SIGKILLed replay, and a worker's API."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from prometheus_client.parser import text_string_to_metric_families

from app.review.store import ReviewStore
from app.sidereads import side_consumer, topic_partitions
from byzguard import config as guard_config
from byzguard.review import Action, ReviewFilter, Status
from byzguard.routing import quarantine_headers
from byzguard.stamp import Stamper
from byzguard.verdict import Code, Outcome, Reason
from tests.conftest import unique_name
from tests.integration.worker_harness import Events, Out, WorkerFactory, collect, produce

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
CONFIG = """\
routes:
  - name: prices
    inputs: [{input}]
    verified_topic: {verified}
    quarantine_topic: {quarantine}
    partitions: 2
    default_type: price.updated
    types: {{price.updated: {{}}}}
"""


@dataclass
class Deployment:
    """One test's route topics, app id and config file, as a worker and the CLI would see them."""

    bootstrap: str
    app_id: str
    config: Path
    input: str
    verified: str
    quarantine: str

    def store(self) -> ReviewStore:
        """A review store of this deployment (as a worker or a CLI run holds one)."""
        return ReviewStore(self.bootstrap, guard_config.load(self.config), app_id=self.app_id)

    def env(self) -> dict[str, str]:
        """The environment of a CLI process of this deployment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BYZGUARD_", "KAFKA_"))}
        env.update({"BYZGUARD_BROKER": self.bootstrap, "BYZGUARD_CONFIG": str(self.config),
                    "BYZGUARD_APP_ID": self.app_id, "BYZGUARD_REVIEWER": "carol", "COLUMNS": "200"})
        return env

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `byzguard quarantine ARGS` and return its result."""
        done = subprocess.run([sys.executable, "-m", "app.cli", "quarantine", *args], cwd=REPO, env=self.env(),
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"`quarantine {' '.join(args)}` exited {done.returncode}:\n{done.stdout}\n"
                                 f"{done.stderr}")
        return done

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start `byzguard quarantine ARGS` in the background."""
        return subprocess.Popen([sys.executable, "-m", "app.cli", "quarantine", *args], cwd=REPO, env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def deployment(kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path) -> Deployment:
    """Fresh input, verified and quarantine topics (2 partitions) and a unique app id (so decisions topic)."""
    names = {part: topic_factory(partitions=2, suffix=part) for part in ("in", "verified", "quarantine")}
    config = tmp_path / "byzguard.yaml"
    config.write_text(CONFIG.format(input=names["in"], verified=names["verified"], quarantine=names["quarantine"]))
    app_id = unique_name("rv", kafka_bootstrap)  # its decisions topic is deleted after the module
    return Deployment(kafka_bootstrap, app_id, config, names["in"], names["verified"], names["quarantine"])


@pytest.fixture
async def store(deployment: Deployment) -> AsyncIterator[ReviewStore]:
    """A started review store of the test's deployment."""
    async with deployment.store() as started:
        yield started


async def quarantine(dep: Deployment, n: int, *, code: Code = Code.VERSION_REGRESSION, pad: int = 0) -> list[str]:
    """Write `n` records to quarantine exactly as the guard does (input coordinates p = i % 2, offset i // 2), each
    detected a millisecond after the one before; `pad` adds that many bytes to each record's data."""
    stamper = Stamper("pricing")
    producer = AIOKafkaProducer(bootstrap_servers=dep.bootstrap, acks="all")
    await producer.start()
    qids = []
    try:
        start = time.time()
        for i in range(n):
            data: dict[str, Any] = {"price": 10 + i, **({"pad": "x" * pad} if pad else {})}
            stamped = stamper.binary(data, type="price.updated", subject=f"sku-{i}", version=1, time=time.time())
            partition, offset = i % 2, i // 2
            headers = quarantine_headers(stamped.headers, Outcome.QUARANTINED, [Reason(code, "test")], "prices",
                                         topic=dep.input, partition=partition, offset=offset,
                                         timestamp=time.time(), now=start + i / 1000)
            await producer.send(dep.quarantine, stamped.value, key=stamped.key, headers=headers,
                                partition=partition)
            qids.append(f"{dep.input}-{partition}-{offset}")
        await producer.flush()
    finally:
        await producer.stop()
    return qids


def replayed_ids(records: list[Out]) -> Counter[str]:
    """How often each quarantine id arrived on the verified topic as a replayed record."""
    return Counter((r.header("byzguard_quarantine_id") or b"").decode() for r in records
                   if r.header("byzguard_replayed") == b"1")


async def count_committed(bootstrap: str, topic: str) -> int:
    """How many records a read_committed consumer sees on `topic` right now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, isolation_level="read_committed",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(2)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        seen = 0
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            batch = await consumer.getmany(*tps, timeout_ms=200)
            seen += sum(len(records) for records in batch.values())
        return seen
    finally:
        await consumer.stop()


# --------------------------------------------------------------------------- the store


async def test_decisions_topic_is_created_compacted(deployment: Deployment, store: ReviewStore) -> None:
    """The first decision creates the decisions topic with cleanup.policy=compact: each record's last value is kept."""
    qids = await quarantine(deployment, 1)
    assert (await store.page()).records[0]["quarantine_id"] == qids[0]
    await store.decide(ReviewFilter(ids=frozenset(qids)), Action.REJECT, reviewer="alice")
    admin = AIOKafkaAdminClient(bootstrap_servers=deployment.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, store.decisions_topic)])
    finally:
        await admin.close()
    configs = {name: value for name, value, *_ in described[0].resources[0][4]}
    assert store.decisions_topic == f"{deployment.app_id}-decisions"
    assert configs["cleanup.policy"] == "compact"


async def test_approved_record_is_replayed_once_with_replay_headers(deployment: Deployment,
                                                                    store: ReviewStore) -> None:
    """An approved record reaches the verified topic once, marked replayed; a second approval or replay adds nothing."""
    qids = await quarantine(deployment, 3)
    await store.refresh()
    approved = await store.decide(ReviewFilter(ids=frozenset(qids[:1])), Action.APPROVE, reviewer="alice",
                                  note="price was right")
    assert approved.applied == qids[:1]
    first = await store.replay(runner="test")
    again = await store.replay(runner="test")
    second_approval = await store.decide(ReviewFilter(ids=frozenset(qids[:1])), Action.APPROVE, reviewer="bob")
    assert [q for q, _ in first.delivered] == qids[:1]
    assert again.delivered == []
    assert second_approval.refused and not second_approval.applied

    verified = await collect(deployment.bootstrap, deployment.verified, expected=1, idle=1.0)
    assert replayed_ids(verified) == Counter({qids[0]: 1})
    record = verified[0]
    names = [k for k, _ in record.headers]
    assert len(names) == len(set(names)), "byzguard headers are replaced, never appended"
    assert record.header("byzguard_reviewer") == b"alice"
    assert record.header("ce_source") == b"pricing", "the producer's headers travel with the record"
    decision = store.ledger.decisions[qids[0]]
    assert float(record.header("byzguard_decided_at") or 0) == pytest.approx(decision.last(Action.APPROVE).at)
    assert store.ledger.status(qids[0]) is Status.REPLAYED


async def test_rejected_records_are_never_replayed(deployment: Deployment, store: ReviewStore) -> None:
    """A rejected record stays out of the verified topic through any number of replays."""
    qids = await quarantine(deployment, 2)
    await store.refresh()
    await store.decide(ReviewFilter(ids=frozenset(qids)), Action.REJECT, reviewer="alice", note="forged")
    report = await store.replay(runner="test")
    assert report.delivered == []
    assert await count_committed(deployment.bootstrap, deployment.verified) == 0
    assert {store.ledger.status(q) for q in qids} == {Status.REJECTED}


async def test_review_state_survives_restarts_and_is_the_same_from_any_reader(deployment: Deployment) -> None:
    """A new reader (another worker, a restart) derives the same statuses and histories from the two topics."""
    qids = await quarantine(deployment, 3)
    async with deployment.store() as first:
        await first.refresh()
        await first.decide(ReviewFilter(ids=frozenset(qids[:1])), Action.APPROVE, reviewer="alice")
        await first.decide(ReviewFilter(ids=frozenset(qids[1:2])), Action.REJECT, reviewer="bob", note="no")
        await first.replay(runner="test")
        seen_first = {q: (first.ledger.status(q), first.ledger.decisions.get(q)) for q in qids}
    async with deployment.store() as second:
        await second.refresh()
        seen_second = {q: (second.ledger.status(q), second.ledger.decisions.get(q)) for q in qids}
    assert seen_second == seen_first
    assert [seen_second[q][0] for q in qids] == [Status.REPLAYED, Status.REJECTED, Status.PENDING]


async def test_recheck_resends_the_original_record_to_its_input(deployment: Deployment, store: ReviewStore) -> None:
    """Recheck re-sends the original key, value and producer headers to the input, linked to the quarantine id."""
    qids = await quarantine(deployment, 2)
    found = await store.find(qids[1])
    assert found is not None
    original = found.record
    report = await store.decide(ReviewFilter(ids=frozenset(qids[1:])), Action.RECHECK, reviewer="alice")
    again = await store.decide(ReviewFilter(ids=frozenset(qids[1:])), Action.RECHECK, reviewer="alice")
    assert again.refused, "a record is re-sent through the checks once"

    resent = await collect(deployment.bootstrap, deployment.input, expected=1, idle=1.0)
    assert len(resent) == 1
    record = resent[0]
    assert (record.key, record.value) == (original.key, original.value)
    assert record.headers == [*original.producer_headers(), ("byzguard_recheck_of", qids[1].encode())]
    assert report.delivered == [(qids[1], f"{record.topic}-{record.partition}-{record.offset}")]
    assert record.partition == original.original_partition
    assert store.ledger.status(qids[1]) is Status.RECHECKED


async def test_concurrent_replays_deliver_each_approved_record_once(deployment: Deployment,
                                                                    store: ReviewStore) -> None:
    """Two replays racing from two processes' stores fence each other and still deliver every record once."""
    qids = await quarantine(deployment, 40)
    await store.refresh()
    await store.decide(ReviewFilter(), Action.APPROVE, reviewer="alice")
    async with deployment.store() as other:
        reports = await asyncio.gather(store.replay(runner="one", batch_size=1),
                                       other.replay(runner="two", batch_size=1))
    assert sorted(q for report in reports for q, _ in report.delivered) == sorted(qids)
    verified = await collect(deployment.bootstrap, deployment.verified, expected=len(qids), idle=1.0)
    assert replayed_ids(verified) == Counter(dict.fromkeys(qids, 1))


async def test_pages_are_newest_first_and_the_store_keeps_no_records(deployment: Deployment,
                                                                      store: ReviewStore) -> None:
    """Paging walks the matching records newest first with the total and counts of all, and a list holds no records:
    memory retained after a list of 1,000 records of 8 KB is small, and its peak is a fraction of their size; a
    bulk action over all of them decides each once."""
    import tracemalloc

    qids = await quarantine(deployment, 1000, pad=8_000)
    newest_first = list(reversed(qids))  # each detected after the one before
    await store.page(limit=1)  # warm up: imports, connections, the decisions consumer
    tracemalloc.start()
    try:
        # What starting a reader costs on this cluster (aiokafka's bootstrap reads every topic's metadata: a few MB
        # on a broker with thousands of topics) is not the records' cost: the peak is counted above it.
        reader = side_consumer(deployment.bootstrap, client_id="byzguard-review")
        await reader.start()
        reader.assign(await topic_partitions(reader, store.quarantine_topics))
        await reader.stop()
        del reader
        gc.collect()
        current, reader_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        before = tracemalloc.take_snapshot()
        first = await store.page(limit=50)
        second = await store.page(offset=50, limit=50)
        _, peak = tracemalloc.get_traced_memory()
        peak -= max(0, reader_peak - current)
        totals, reasons = (first.total, second.total), first.counts["reason"]
        second_ids = [r["quarantine_id"] for r in second.records]
        del first, second  # what the caller holds is its own (100 rendered records); the store must hold nothing
        gc.collect()
        retained = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert totals == (1000, 1000)
    assert reasons == {"version.regression": 1000}
    assert second_ids == newest_first[50:100]
    assert not store.ledger.records
    assert retained < 500_000, f"a list retained {retained} bytes"
    # The peak counts the two pages the caller holds (about 1 MB) besides the scan's fetches of at most
    # SCAN_FETCH_BYTES per partition: nowhere near the 8 MB of records a store that kept them would hold.
    assert peak < 1000 * 8_000 * 0.6, f"a list peaked at {peak} bytes for 8 MB of records"
    one = await store.find(qids[123])
    assert one is not None and one.record.quarantine_id == qids[123]
    assert await store.find(f"{deployment.input}-0-99999") is None
    # A bulk action over more records than one transaction takes (DECIDE_CHUNK) decides each once.
    report = await store.decide(ReviewFilter(), Action.REJECT, reviewer="alice", note="bulk")
    assert sorted(report.applied) == sorted(qids) and not report.refused
    rejected = await store.page(ReviewFilter(status=frozenset({Status.REJECTED})), limit=0)
    assert rejected.total == 1000


# --------------------------------------------------------------------------- the CLI


HOSTILE = "\x1b[2J\x1b]0;owned\x07\x9b31m[/x][bold]"


async def quarantine_hostile(dep: Any, depth: int = 300) -> str:
    """One quarantined record with markup and escape sequences in its attributes and data `depth` levels deep
    (`dep`: anything with bootstrap, input and quarantine topic names)."""
    headers = [("ce_specversion", b"1.0"), ("ce_id", b"e-1"), ("ce_source", b"[/x]"), ("ce_type", HOSTILE.encode()),
               ("ce_subject", HOSTILE.encode()), ("content-type", b"application/json")]
    hdrs = quarantine_headers(headers, Outcome.QUARANTINED, [Reason(Code.DECODE_MALFORMED, HOSTILE)], "prices",
                              topic=dep.input, partition=1, offset=7, timestamp=time.time(), now=time.time())
    producer = AIOKafkaProducer(bootstrap_servers=dep.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(dep.quarantine, b'{"a":' * depth + b"1" + b"}" * depth, key=HOSTILE.encode(),
                                     headers=hdrs, partition=1)
    finally:
        await producer.stop()
    return f"{dep.input}-1-7"


async def test_cli_lists_shows_and_decides_a_hostile_record(deployment: Deployment) -> None:
    """A record with `[/x]`, escape sequences and 300 levels of data is listed, shown and rejected by the CLI, and
    nothing it carries reaches the terminal raw."""
    qid = await quarantine_hostile(deployment)
    listed = await asyncio.to_thread(deployment.cli, "list")
    shown = await asyncio.to_thread(deployment.cli, "show", qid)
    shown_json = json.loads((await asyncio.to_thread(deployment.cli, "show", qid, "--json")).stdout)
    rejected = await asyncio.to_thread(deployment.cli, "reject", qid, "-m", "garbage")
    for done in (listed, shown, rejected):
        assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\x9b" not in done.stdout
    assert "[/x]" in listed.stdout and "[/x]" in shown.stdout
    assert "nested deeper than" in shown.stdout
    assert shown_json["source"] == "[/x]" and shown_json["type"] == HOSTILE
    assert "done" in rejected.stdout


async def test_cli_reviews_without_mac_secrets(deployment: Deployment) -> None:
    """The review CLI runs with MAC keys configured whose secrets are not set here: reviewing signs nothing."""
    deployment.config.write_text(deployment.config.read_text().replace(
        "routes:", "keys:\n  pricing-1: {source: pricing, secret_env: BYZGUARD_KEY_NOT_SET_HERE}\nroutes:", 1))
    await quarantine(deployment, 1)
    listed = json.loads((await asyncio.to_thread(deployment.cli, "list", "--json")).stdout)
    assert listed["total"] == 1


async def test_cli_refuses_bad_settings_before_the_broker(deployment: Deployment) -> None:
    """A malformed broker address and a misspelled variable are named, one line each, and nothing is contacted."""
    env = {**deployment.env(), "BYZGUARD_BROKER": "kafka://nowhere", "BYZGUARD_APP_IDD": "x"}
    started = time.monotonic()
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "app.cli", "quarantine", "list"], cwd=REPO,
                                   env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and "Traceback" not in done.stderr, done.stderr
    assert "BYZGUARD_BROKER='kafka://nowhere'" in lines[0] or "BYZGUARD_BROKER='kafka://nowhere'" in lines[1]
    assert any("BYZGUARD_APP_IDD: unknown setting; did you mean BYZGUARD_APP_ID?" in line for line in lines)
    assert time.monotonic() - started < 20


async def test_cli_lists_shows_approves_rejects_and_replays(deployment: Deployment) -> None:
    """The CLI works without a worker: list with counts, show, reject, approve without replay, then replay."""
    qids = await quarantine(deployment, 3, code=Code.INVARIANT_VIOLATED)

    listed = json.loads((await asyncio.to_thread(deployment.cli, "list", "--json")).stdout)
    assert listed["total"] == 3
    assert listed["counts"]["reason"] == {"invariant.violated": 3}
    shown = json.loads((await asyncio.to_thread(deployment.cli, "show", qids[0], "--json")).stdout)
    assert shown["data"]["data"] == {"price": 10}
    assert shown["original"] == {"topic": deployment.input, "partition": 0, "offset": 0,
                                 "timestamp": pytest.approx(shown["original"]["timestamp"])}
    assert shown["entity_state"]["state"] is None  # no worker ever verified sku-0

    await asyncio.to_thread(deployment.cli, "reject", qids[1], "-m", "really wrong")
    # A rejected record may still be approved while it has not been delivered.
    await asyncio.to_thread(deployment.cli, "approve", qids[0], qids[1], "--no-replay", "-m", "fine after all")
    replay = json.loads((await asyncio.to_thread(deployment.cli, "replay", "--json")).stdout)
    assert sorted(d["quarantine_id"] for d in replay["delivered"]) == sorted(qids[:2])

    rejected_late = await asyncio.to_thread(deployment.cli, "reject", qids[0], "--json", check=False)
    assert rejected_late.returncode == 1, "a delivered record can no longer be rejected"
    assert json.loads(rejected_late.stdout)["refused"][0]["quarantine_id"] == qids[0]
    async with deployment.store() as reader:
        await reader.refresh()
        assert [reader.ledger.status(q) for q in qids] == [Status.REPLAYED, Status.REPLAYED, Status.PENDING]
        history = reader.ledger.decisions[qids[1]].history
        assert [(e.action, e.reviewer, e.note) for e in history[:2]] == [
            (Action.REJECT, "cli:carol", "really wrong"), (Action.APPROVE, "cli:carol", "fine after all")]
    verified = await collect(deployment.bootstrap, deployment.verified, expected=2, idle=1.0)
    assert replayed_ids(verified) == Counter({qids[0]: 1, qids[1]: 1})


@pytest.mark.slow
async def test_replay_killed_mid_way_then_rerun_delivers_each_approved_record_once(deployment: Deployment,
                                                                                  store: ReviewStore) -> None:
    """A replay SIGKILLed mid-way and run again delivers every approved record exactly once, none twice."""
    total = 120
    qids = await quarantine(deployment, total)
    await store.refresh()
    report = await store.decide(ReviewFilter(), Action.APPROVE, reviewer="alice")
    assert len(report.applied) == total

    # One record per transaction, 40 per second: about 3 s of work to kill in the middle of.
    proc = await asyncio.to_thread(deployment.popen, "replay", "--batch-size", "1", "--rate", "40")
    try:
        deadline = time.monotonic() + 60
        while await count_committed(deployment.bootstrap, deployment.verified) < 15:
            assert proc.poll() is None, f"replay ended before it could be killed:\n{proc.communicate()}"
            assert time.monotonic() < deadline, "replay delivered nothing within 60 s"
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    before_rerun = await count_committed(deployment.bootstrap, deployment.verified)
    assert 15 <= before_rerun < total, "the kill must land mid-way"

    rerun = json.loads((await asyncio.to_thread(deployment.cli, "replay", "--json", timeout=120)).stdout)
    assert len(rerun["delivered"]) == total - before_rerun, "the rerun delivers only what the first run did not"
    verified = await collect(deployment.bootstrap, deployment.verified, expected=total, idle=1.0)
    counted = replayed_ids(verified)
    assert set(counted) == set(qids)
    assert [q for q, n in counted.items() if n != 1] == [], "no record may be delivered twice"
    async with deployment.store() as fresh:
        await fresh.refresh()
        assert {fresh.ledger.status(q) for q in qids} == {Status.REPLAYED}


# --------------------------------------------------------------------------- a worker's review API


@pytest.mark.slow
async def test_worker_review_api(worker_factory: WorkerFactory) -> None:
    """A worker serves the review API: 401 without a token, filters and counts, entity state, recheck, approve."""
    route = worker_factory.configure(partitions=2)
    worker = worker_factory.new_worker("w1")
    worker.env["BYZGUARD_REVIEW_TOKEN"] = "s3cret"
    worker.start()
    await asyncio.to_thread(worker.wait_ready)
    bootstrap = worker_factory.bootstrap
    events = Events()
    await produce(bootstrap, route.input, [events.clean("ord-1", 1), events.clean("ord-1", 2),
                                           events.regression("ord-1", 1)])

    base = f"http://127.0.0.1:{worker.web_port}/review/api"
    auth = {"Authorization": "Bearer s3cret", "X-Byzguard-Reviewer": "alice"}
    async with aiohttp.ClientSession() as http:

        async def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
            async with http.get(base + path, headers=auth if headers is None else headers) as resp:
                return resp.status, await resp.json()

        async def post(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
            async with http.post(base + path, json=body, headers=auth if headers is None else headers) as resp:
                return resp.status, await resp.json()

        async def wait_for(path: str, ready: Callable[[Any], bool]) -> Any:
            deadline = time.monotonic() + 60
            while True:
                status, body = await get(path)
                if status == 200 and ready(body):
                    return body
                assert time.monotonic() < deadline, f"{path} never became ready: {status} {body}"
                await asyncio.sleep(0.3)

        listed = await wait_for("/records?status=pending&reason=version", lambda b: b["total"] == 1)
        qid = listed["records"][0]["quarantine_id"]
        assert listed["counts"]["reason"] == {"version.regression": 1}

        assert (await get("/records", headers={}))[0] == 401
        # Bad request bodies and parameters are a 400 that says what is wrong, and nothing is done.
        for body, says in (({"action": "reject", "ids": 5}, "ids must be a list"),
                           ({"action": "reject", "filter": {}, "expected": "abc"}, "expected must be"),
                           ({"action": "reject", "filter": []}, "filter must be a JSON object"),
                           ({"action": "reject", "filter": {"colour": "red"}}, "unknown filter field"),
                           ({"action": "reject", "ids": [qid], "note": {"x": 1}}, "note must be a string")):
            status, problem = await post("/bulk", body)
            assert (status, says in str(problem)) == (400, True), (body, status, problem)
        status, problem = await post("/replay", {"ids": "all"})
        assert status == 400 and "ids must be a list" in str(problem)
        status, problem = await post(f"/records/{qid}/approve", {"replay": "yes"})
        assert status == 400 and "replay must be true or false" in str(problem)
        assert (await get("/records?limit=lots"))[0] == 400
        paged = (await get("/records?limit=1&offset=1"))[1]
        assert (paged["offset"], paged["limit"], len(paged["records"])) == (1, 1, 0)
        for headers in ({}, {"Authorization": "Bearer wrong", "X-Byzguard-Reviewer": "eve"},
                        {"Authorization": "Bearer s3cret"}):
            status, body = await post(f"/records/{qid}/approve", {}, headers=headers)
            assert status == 401, body
        status, body = await get(f"/records/{qid}")
        assert status == 200 and body["status"] == "pending", "a refused write records nothing"

        entity = body["entity_state"]
        assert entity["where"] == "here"
        assert entity["state"]["version"] == 2
        assert body["data"]["attributes"]["version"] == 1

        status, body = await post(f"/records/{qid}/recheck", {"note": "key registered since"})
        assert status == 200 and body["applied"] == [qid]
        again = await wait_for("/records?status=pending", lambda b: any(r["recheck_of"] == qid for r in b["records"]))
        new_qid = next(r["quarantine_id"] for r in again["records"] if r["recheck_of"] == qid)
        assert new_qid == body["delivered"][0]["to"], "the new quarantine record links back to the old one"
        assert (await get(f"/records/{qid}"))[1]["rechecked_as"] == new_qid

        # A record nested 300 levels deep, with markup and escape sequences, is listed and shown (cut), not a 500.
        hostile = await quarantine_hostile(SimpleNamespace(bootstrap=bootstrap, input=route.input,
                                                           quarantine=route.quarantine))
        listed = await wait_for("/records?source=[/x]", lambda b: b["total"] == 1)
        assert listed["records"][0]["quarantine_id"] == hostile
        status, detail = await get(f"/records/{hostile}")
        assert status == 200 and "nested deeper than" in json.dumps(detail["data"])

        status, body = await post(f"/records/{new_qid}/approve", {"note": "known late update"})
        assert status == 200 and [d["quarantine_id"] for d in body["replay"]["delivered"]] == [new_qid]
        status, body = await post(f"/records/{new_qid}/approve", {})
        assert status == 409, "a second approval is refused and delivers nothing"
        detail = (await get(f"/records/{new_qid}"))[1]
        assert detail["status"] == "replayed"
        assert detail["entity_state"]["state"]["version"] == 2, "a replayed regression does not roll state back"

    verified = await collect(bootstrap, route.verified, expected=3, idle=1.0)
    assert replayed_ids(verified) == Counter({new_qid: 1})
    # The worker's backlog gauge follows the decisions: the hostile record pending, one rechecked, one replayed.
    wanted = {"pending": 1.0, "approved": 0.0, "rejected": 0.0, "rechecked": 1.0, "replayed": 1.0}
    deadline = time.monotonic() + 45
    while (backlog := await asyncio.to_thread(backlog_of, worker)) != wanted:
        assert time.monotonic() < deadline, backlog
        await asyncio.sleep(1)


def backlog_of(worker: Any) -> dict[str, float]:
    """byzguard_quarantine_backlog_records of a worker, by status (summed over routes)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "byzguard_quarantine_backlog_records":
                out[sample.labels["status"]] = out.get(sample.labels["status"], 0.0) + sample.value
    return out


async def test_review_page_of_a_worker_that_does_not_own_the_entity_names_its_owner(
        worker_factory: WorkerFactory) -> None:
    """With two batched workers sharing the route's partitions, a quarantined record's detail shows the entity's
    verified state on the worker that owns its partition, and on the other worker says where it is: `elsewhere`,
    naming the owner's URL (the one /entities is served by), with no state of its own."""
    route = worker_factory.configure(partitions=2)
    workers = []
    for name in ("w1", "w2"):
        worker = worker_factory.new_worker(name)
        worker.env["BYZGUARD_REVIEW_TOKEN"] = "s3cret"
        workers.append(worker.start())
    for worker in workers:
        await asyncio.to_thread(worker.wait_ready)
    events = Events()
    await produce(worker_factory.bootstrap, route.input, [events.clean("ord-1", 1), events.clean("ord-1", 2),
                                                          events.regression("ord-1", 1)])
    auth = {"Authorization": "Bearer s3cret", "X-Byzguard-Reviewer": "alice"}
    urls = [f"http://127.0.0.1:{w.web_port}" for w in workers]
    async with aiohttp.ClientSession() as http:

        async def get(url: str) -> tuple[int, Any]:
            async with http.get(url, headers=auth) as resp:
                return resp.status, await resp.json()

        deadline = time.monotonic() + 90
        while True:
            listed = [await get(f"{u}/review/api/records?status=pending") for u in urls]
            if all(status == 200 and body["total"] == 1 for status, body in listed):
                qid = listed[0][1]["records"][0]["quarantine_id"]
                details = [(await get(f"{u}/review/api/records/{qid}"))[1]["entity_state"] for u in urls]
                if sorted(d["where"] for d in details) == ["elsewhere", "here"]:
                    break
            assert time.monotonic() < deadline, f"the two workers never split the partitions: {listed}"
            await asyncio.sleep(0.5)
        status, lkg = await get(f"{urls[0]}/entities/orders/ord-1")
    here, elsewhere = sorted(details, key=lambda d: d["where"] != "here")
    owner = urls[details.index(here)]
    assert here["state"]["version"] == 2 and here["partition"] == elsewhere["partition"]
    assert elsewhere["state"] is None and elsewhere["workers"] == [owner], elsewhere
    assert owner in elsewhere["detail"]
    assert status == 200 and lkg["served_by"] == owner, lkg



async def test_open_reads_serve_the_list_and_a_record_without_a_token_but_no_write(
        worker_factory: WorkerFactory) -> None:
    """BYZGUARD_REVIEW_OPEN_READS=true: the review API's list and detail answer a request without a token; an
    approval without one is still refused (401) and records nothing. Without the setting, the same read is a 401
    (test_worker_review_api)."""
    route = worker_factory.configure(partitions=1)
    worker = worker_factory.new_worker("w1")
    worker.env["BYZGUARD_REVIEW_TOKEN"] = "s3cret"
    worker.env["BYZGUARD_REVIEW_OPEN_READS"] = "true"
    worker.start()
    await asyncio.to_thread(worker.wait_ready)
    events = Events()
    await produce(worker_factory.bootstrap, route.input, [events.clean("ord-1", 1), events.clean("ord-1", 2),
                                                          events.regression("ord-1", 1)])
    base = f"http://127.0.0.1:{worker.web_port}/review/api"
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 60
        while True:
            async with http.get(base + "/records?status=pending") as resp:
                status, listed = resp.status, await resp.json()
            assert status == 200, (status, listed)  # no token, no 401
            if listed["total"] == 1:
                break
            assert time.monotonic() < deadline, f"the regression was never quarantined: {listed}"
            await asyncio.sleep(0.3)
        qid = listed["records"][0]["quarantine_id"]
        async with http.get(f"{base}/records/{qid}") as resp:
            status, detail = resp.status, await resp.json()
        assert (status, detail["status"], detail["data"]["attributes"]["version"]) == (200, "pending", 1)
        for headers in ({}, {"X-Byzguard-Reviewer": "eve"}):
            async with http.post(f"{base}/records/{qid}/approve", json={}, headers=headers) as resp:
                assert resp.status == 401, await resp.text()
        async with http.get(f"{base}/records/{qid}") as resp:
            assert (await resp.json())["status"] == "pending", "a refused write records nothing"
