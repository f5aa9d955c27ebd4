"""A producer written in TypeScript (tests/clients/ts/producer.ts: the PriceData value, a hybrid Lamport clock,
ENVELOPE.md's bound-form HMAC) sending with kafkajs to the real broker, against a worker on the example
configuration's `prices` route: what it sends right is verified, what it sends wrong gets the right code, and
kafkajs's default partitioner places every key where byzguard keeps the entity's state."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from byzguard.partitioner import partition_for
from tests.conftest import run_async
from tests.integration.users_clients import PricesWorker, start_prices_worker, ts_producer
from tests.integration.worker_harness import WorkerFactory, by_id, collect, wait_caught_up

pytestmark = pytest.mark.kafka

#: Plain, non-ASCII (the key is UTF-8) and longer subjects.
SUBJECTS = ["sku-1", "sku-2", "sku-3", "sku-é-4", "sku-日本-5", "sku-" + "x" * 40 + "-6"]


def send(prices: PricesWorker, bootstrap: str, tmp_path: Path, events: list[dict[str, Any]], *,
         partitioner: str = "default", gzip: bool = False, transaction: str | None = None
         ) -> dict[str, dict[str, Any]]:
    """Run the TypeScript producer over `events`; what it reports for each event id (partition, Lamport time)."""
    producer = ts_producer()
    plan = tmp_path / f"plan-{partitioner}-{gzip}-{transaction}.json"
    plan.write_text(json.dumps({"broker": bootstrap, "topic": prices.topic, "source": "pricing", "keyId": "pricing-1",
                                "secretEnv": "BYZGUARD_KEY_PRICING_1", "partitioner": partitioner, "gzip": gzip,
                                "transaction": transaction, "events": events}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYZGUARD_")}
    env.update({"BYZGUARD_KEY_PRICING_1": prices.secret, "KAFKAJS_NO_PARTITIONER_WARNING": "1"})
    done = subprocess.run(["node", str(producer), str(plan)], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, f"the TypeScript producer failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["id"] for r in reports] == [e["id"] for e in events], done.stdout
    return {r["id"]: r for r in reports}


def test_typescript_kafkajs_producer_is_verified_and_its_faults_get_their_codes(
        worker_factory: WorkerFactory, tmp_path: Path) -> None:
    """Clean prices from the TypeScript producer are verified, each in the partition kafkajs's default partitioner
    chose, which is byzguard's; in the same stream a stale version is version.regression, a Lamport time stamped
    before the instance's newer events is lamport.regression and a changed MAC digit is integrity.bad_mac; with
    kafkajs's LegacyPartitioner a key placed elsewhere is decode.wrong_partition; gzip-compressed batches and a
    committed transaction are verified, an aborted transaction reaches no output and leaves no state."""
    prices = start_prices_worker(worker_factory, tmp_path)
    bootstrap = worker_factory.bootstrap
    earlier = time.time_ns() // 1000 - 10_000_000  # a Lamport reading of 10 s ago: below what the clock gives now
    clean = [{"id": f"clean-{s}-{v}", "subject": s, "version": v, "price": 49.99} for v in (1, 2) for s in SUBJECTS]
    faults = {
        "stale-1": ({"subject": SUBJECTS[0], "version": 1}, "version.regression"),
        "reordered-1": ({"subject": SUBJECTS[1], "version": 3, "lamportTime": earlier}, "lamport.regression"),
        "tampered-1": ({"subject": SUBJECTS[2], "version": 3, "tamper": "checksum"}, "integrity.bad_mac"),
    }
    events = clean + [{"id": event_id, "price": 49.99, **fields} for event_id, (fields, _) in faults.items()]
    reports = send(prices, bootstrap, tmp_path, events)
    legacy_events = [{"id": f"legacy-{s}-3", "subject": s, "version": 3, "price": 49.99} for s in SUBJECTS]
    legacy = send(prices, bootstrap, tmp_path, legacy_events, partitioner="legacy")
    gzipped = [{"id": f"gzip-{s}-1", "subject": f"gzip-{s}", "version": 1, "price": 49.99} for s in SUBJECTS]
    send(prices, bootstrap, tmp_path, gzipped, gzip=True)
    transacted, aborted = send_transactions(prices, bootstrap, tmp_path)

    for event in clean:  # kafkajs's default partitioner is Kafka's murmur2, on the key's UTF-8 bytes
        assert reports[event["id"]]["partition"] == partition_for(event["subject"].encode(), prices.partitions)
    misplaced = {e["id"] for e in legacy_events
                 if legacy[e["id"]]["partition"] != partition_for(e["subject"].encode(), prices.partitions)}
    assert misplaced, "the legacy partitioner placed every subject as murmur2 does: pick other subjects"

    sent = len(events) + len(legacy_events) + len(gzipped) + len(transacted)  # the aborted ones are never read
    expect_verified = len(clean) + len(legacy_events) - len(misplaced) + len(gzipped) + len(transacted)
    run_async(lambda: wait_caught_up(bootstrap, worker_factory.app_id, [prices.topic], workers=[prices.worker]))
    passed = by_id(run_async(lambda: collect(bootstrap, prices.verified, expected=expect_verified)))
    refused = by_id(run_async(lambda: collect(bootstrap, prices.quarantine, expected=sent - expect_verified)))
    assert set(passed) == {e["id"] for e in clean + legacy_events + gzipped} - misplaced | transacted, \
        {i: o[0].reasons for i, o in refused.items()}
    for outs in passed.values():
        assert len(outs) == 1 and outs[0].codes == set(), outs
    assert set(refused) == set(faults) | misplaced
    assert not (set(passed) | set(refused)) & aborted, "an aborted transaction's event reached an output"
    for event_id, (_, code) in faults.items():
        assert refused[event_id][0].codes == {code}, refused[event_id][0].reasons
    for event_id in misplaced:  # whose detail says what to set in kafkajs
        assert refused[event_id][0].codes == {"decode.wrong_partition"}, refused[event_id][0].reasons
        assert "LegacyPartitioner" in refused[event_id][0].reasons[0]["detail"]



def send_transactions(prices: PricesWorker, bootstrap: str, tmp_path: Path) -> tuple[set[str], set[str]]:
    """Versions 1 of three prices in a kafkajs transaction that commits, versions 2 in one that aborts, then
    other versions 2 sent plainly; the ids that must be verified, and the aborted ones."""
    subjects = ["tx-1", "tx-2", "tx-3"]
    committed = [{"id": f"committed-{s}-1", "subject": s, "version": 1, "price": 49.99} for s in subjects]
    aborted = [{"id": f"aborted-{s}-2", "subject": s, "version": 2, "price": 10.0} for s in subjects]
    after = [{"id": f"after-{s}-2", "subject": s, "version": 2, "price": 49.99} for s in subjects]
    send(prices, bootstrap, tmp_path, committed, transaction="commit")
    send(prices, bootstrap, tmp_path, aborted, transaction="abort")
    send(prices, bootstrap, tmp_path, after)
    return {e["id"] for e in committed + after}, {e["id"] for e in aborted}


def test_at_least_once_never_verifies_the_events_of_an_aborted_transaction(worker_factory: WorkerFactory,
                                                                          tmp_path: Path) -> None:
    """Under at_least_once too, prices a kafkajs transaction aborted reach neither output, and the next versions
    are judged as if they had never been sent."""
    worker_factory.processing_guarantee = "at_least_once"
    prices = start_prices_worker(worker_factory, tmp_path)
    bootstrap = worker_factory.bootstrap
    verified, aborted = send_transactions(prices, bootstrap, tmp_path)
    run_async(lambda: wait_caught_up(bootstrap, worker_factory.app_id, [prices.topic], workers=[prices.worker]))
    passed = by_id(run_async(lambda: collect(bootstrap, prices.verified, expected=len(verified))))
    refused = by_id(run_async(lambda: collect(bootstrap, prices.quarantine)))
    assert not (set(passed) | set(refused)) & aborted and set(passed) == verified and refused == {}, \
        ({i: o[0].reasons for i, o in passed.items()}, {i: o[0].reasons for i, o in refused.items()})
