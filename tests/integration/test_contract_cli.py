"""`byzguard contract check|diff` end to end: JSON-lines files, and live topics on the real broker without a group."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from typer.testing import CliRunner

from app.cli import cli
from bench.kafka import listed_topics
from byzguard.contract import contract_from_text
from byzguard.guard import ENTITIES
from byzguard.integrity import HMAC_SHA256, Key
from byzguard.stamp import Stamped, Stamper
from tests.conftest import unique_name

SECRET = "cli-test-secret"
ENV = {"CLI_TEST_KEY_PRICING": SECRET, "COLUMNS": "240", "NO_COLOR": "1"}
CONFIG = """
keys:
  pricing-1: {source: pricing, secret_env: CLI_TEST_KEY_PRICING}
routes:
  - name: prices
    inputs: [prices]
    verified_topic: prices.verified
    quarantine_topic: prices.quarantine
    partitions: 2
    require_checksum: true
    types:
      price.updated:
        sources: [pricing]
        key_ids: [pricing-1]
        rules:
          - {name: price_positive, expr: "data.price > 0"}
"""

runner = CliRunner()


def stamper() -> Stamper:
    return Stamper("pricing", algorithm=HMAC_SHA256, key=Key("pricing-1", "pricing", SECRET.encode()))


def ev(s: Stamper, sku: str, price: float, version: int) -> Stamped:
    return s.binary({"sku": sku, "price": price, "currency": "USD"}, type="price.updated", subject=sku,
                    version=version, time=time.time())


def as_line(record: Stamped) -> str:
    return json.dumps({"key": record.key.decode(), "value": record.value.decode(),
                       "headers": [[k, v.decode()] for k, v in record.headers]})


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "byzguard.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    return path


def invoke(*args: str) -> Any:
    return runner.invoke(cli, list(args), env=ENV)


# --------------------------------------------------------------------------- --events FILE


def test_events_file_reports_rejects_and_exits_one(config_file: Path, tmp_path: Path) -> None:
    """A JSON-lines sample with a zero price fails: the table names the line, key and code, and the exit is 1."""
    s = stamper()
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join([as_line(ev(s, "sku-1", 49.99, 1)), as_line(ev(s, "sku-404", 0, 1)),
                                 as_line(ev(s, "sku-1", 51.0, 2))]) + "\n")
    result = invoke("contract", "check", str(config_file), "--route", "prices", "--events", str(events))
    assert result.exit_code == 1, result.output
    assert f"{events}:2" in result.output and "sku-404" in result.output
    assert "invariant.violated" in result.output and "rule 'price_positive' failed" in result.output
    assert "FAIL: route 'prices': 3 event(s): 2 verified, 1 quarantined" in result.output


def test_events_file_json_output_and_clean_pass(config_file: Path, tmp_path: Path) -> None:
    """A clean sample exits 0; --json prints the report with outcomes and findings for machines."""
    s = stamper()
    events = tmp_path / "clean.jsonl"
    events.write_text(as_line(ev(s, "sku-1", 49.99, 1)) + "\n" + as_line(ev(s, "sku-1", 49.99, 1)) + "\n")
    result = invoke("contract", "check", str(config_file), "--events", str(events), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["total"] == 2
    assert report["outcomes"] == {"verified": 1, "duplicate": 1}
    assert [(f["where"], f["outcome"]) for f in report["findings"]] == [(f"{events}:2", "duplicate")]


def test_diff_exits_one_when_new_config_newly_rejects(config_file: Path, tmp_path: Path) -> None:
    """`contract diff OLD NEW` lists the events NEW newly rejects and exits 1; the reverse direction exits 0."""
    tightened = tmp_path / "new.yaml"
    tightened.write_text(config_file.read_text().replace("data.price > 0", "data.price >= 1"))
    s = stamper()
    events = tmp_path / "events.jsonl"
    events.write_text(as_line(ev(s, "sku-1", 49.99, 1)) + "\n" + as_line(ev(s, "sku-2", 0.5, 1)) + "\n")
    result = invoke("contract", "diff", str(config_file), str(tightened), "--route", "prices", "--events", str(events))
    assert result.exit_code == 1, result.output
    assert "newly_rejected" in result.output and "sku-2" in result.output and "invariant.violated" in result.output
    assert "1 newly rejected" in result.output
    back = invoke("contract", "diff", str(tightened), str(config_file), "--events", str(events))
    assert back.exit_code == 0, back.output
    assert "1 no longer rejected" in back.output


def test_installed_script_reads_plain_events_from_stdin(config_file: Path) -> None:
    """The installed `byzguard` script checks plain event objects from stdin, keyed by --key-field."""
    s = stamper()

    def plain(sku: str, price: float) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(s.structured({"sku": sku, "price": price}, type="price.updated",
                                                        subject=sku, version=1).value)
        del event["subject"]  # the entity id now comes from the record key, taken from data.sku
        return event

    script = Path(sys.executable).with_name("byzguard")

    def run(*events: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), "contract", "check", str(config_file), "--route", "prices",
                               "--events", "-", "--key-field", "data.sku"],
                              input="\n".join(json.dumps(e) for e in events), capture_output=True, text=True,
                              env={**os.environ, **ENV}, timeout=120)

    result = run(plain("sku-1", 3.0), plain("sku-404", 0))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL: route 'prices': 2 event(s): 1 verified, 1 quarantined" in result.stdout  # line 1 keyed and MACed
    assert "<stdin>:2" in result.stdout and "sku-404" in result.stdout and "invariant.violated" in result.stdout


# --------------------------------------------------------------------------- --topic T --sample N (real broker)


async def _groups(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {g[0] for g in await admin.list_consumer_groups()}
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, records: list[tuple[int, bytes | None, bytes | None, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for partition, key, value, headers in records:
            await producer.send_and_wait(topic, value, key=key, partition=partition, headers=headers)
            await asyncio.sleep(0.002)  # distinct timestamps: the sample's order is the send order
    finally:
        await producer.stop()


async def _admin_topics(bootstrap: str, create: list[str] | None = None, delete: list[str] | None = None) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if create:
            await admin.create_topics([NewTopic(t, 2, 1) for t in create])
        if delete:
            await admin.delete_topics(delete)
    finally:
        await admin.close()


@pytest.fixture
def app_id(kafka_bootstrap: str) -> str:
    """A fresh guard app id whose state changelog topic exists (2 partitions); deleted afterwards."""
    name = unique_name("contract-test", kafka_bootstrap)
    asyncio.run(_admin_topics(kafka_bootstrap, create=[f"{name}-prices-state_by_entity-changelog"]))
    return name


@pytest.mark.kafka
def test_topic_sample_reads_without_a_consumer_group_and_fails_on_reject(
    kafka_bootstrap: str, topic_factory: Any, config_file: Path
) -> None:
    """`--topic T --sample N` reads the last N records of a live topic without creating a group, and exits 1."""
    topic = topic_factory(2)
    s = stamper()
    records = [ev(s, "sku-1", 10.0, 1), ev(s, "sku-2", 20.0, 1), ev(s, "sku-1", 11.0, 2), ev(s, "sku-404", 0, 1),
               ev(s, "sku-2", 21.0, 2)]
    asyncio.run(_produce(kafka_bootstrap, topic, [(i % 2, r.key, r.value, r.headers) for i, r in enumerate(records)]))
    before = asyncio.run(_groups(kafka_bootstrap))

    result = invoke("contract", "check", str(config_file), "--route", "prices", "--topic", topic, "--sample", "10",
                    "--broker", kafka_bootstrap, "--timeout", "30")
    assert result.exit_code == 1, result.output
    assert "sku-404" in result.output and "invariant.violated" in result.output
    assert f"{topic}[1]@1" in result.output  # the 4th record went to partition 1, its 2nd record
    assert "5 event(s): 4 verified, 1 quarantined" in result.output

    last_two = invoke("contract", "check", str(config_file), "--topic", topic, "--sample", "2",
                      "--broker", kafka_bootstrap, "--json")
    assert last_two.exit_code == 1, last_two.output
    assert json.loads(last_two.stdout)["total"] == 2
    first_three = invoke("contract", "check", str(config_file), "--topic", topic, "--sample", "3", "--first",
                         "--broker", kafka_bootstrap, "--json")
    assert first_three.exit_code == 0, first_three.output
    assert json.loads(first_three.stdout)["outcomes"] == {"verified": 3}

    assert asyncio.run(_groups(kafka_bootstrap)) == before

    # Control: a consumer that commits under a group id does show up, so the comparison above can see one.
    async def commit_as_group(group: str) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.commit({tp: 1})
        finally:
            await consumer.stop()

    group = f"control-{uuid.uuid4().hex[:6]}"
    asyncio.run(commit_as_group(group))
    assert group in asyncio.run(_groups(kafka_bootstrap)) - before


@pytest.mark.kafka
def test_snapshot_starts_from_the_live_state(
    kafka_bootstrap: str, topic_factory: Any, config_file: Path, app_id: str
) -> None:
    """`--snapshot` reads the route's changelog to its end (last value wins, tombstones delete) and checks from it."""
    s = stamper()
    state = contract_from_text(textwrap.dedent(CONFIG), "prices", secrets={"pricing-1": SECRET}).check(
        [(r.key, r.value, r.headers) for r in (ev(s, "sku-1", 9.0, 5), ev(s, "sku-9", 9.0, 9))]
    ).state.tables[ENTITIES][-1]
    changelog = f"{app_id}-prices-state_by_entity-changelog"
    asyncio.run(_produce(kafka_bootstrap, changelog, [
        (0, b"sku-1", b"stale value, replaced by the next record", None),
        (0, b"sku-1", state[b"sku-1"], None),
        (0, b"sku-9", state[b"sku-9"], None),
        (0, b"sku-9", None, None),  # tombstone: sku-9 forgotten
    ]))
    topic = topic_factory(2)
    sample = [ev(s, "sku-1", 9.5, 3), ev(s, "sku-9", 9.0, 1)]
    asyncio.run(_produce(kafka_bootstrap, topic, [(0, r.key, r.value, r.headers) for r in sample]))
    before = asyncio.run(_groups(kafka_bootstrap))

    empty = invoke("contract", "check", str(config_file), "--topic", topic, "--broker", kafka_bootstrap)
    assert empty.exit_code == 0, empty.output
    live = invoke("contract", "check", str(config_file), "--topic", topic, "--broker", kafka_bootstrap,
                  "--snapshot", "--app-id", app_id, "--json")
    assert live.exit_code == 1, live.output
    report = json.loads(live.stdout)
    assert [(f["key"], [r["code"] for r in f["reasons"]]) for f in report["findings"]] == [
        ("sku-1", ["version.regression"])]
    assert asyncio.run(_groups(kafka_bootstrap)) == before
    # The changelogs this app id does not have were looked for, never created.
    assert f"{app_id}-prices-lamport_by_source-changelog" not in asyncio.run(listed_topics(kafka_bootstrap))
