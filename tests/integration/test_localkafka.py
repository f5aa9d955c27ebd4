"""Integration tests of the project-started Kafka broker (app.dev.localkafka) and the suite's Kafka fixtures."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from app.dev.localkafka import FAST_START_JVM_FLAGS, LocalKafka, ensure_broker_jars, ensure_running, resolve_version

pytestmark = pytest.mark.kafka

needs_jvm = pytest.mark.usefixtures("jvm")  # java and mvn, or the test fails (tests/conftest.py)


async def _read_partition(
    bootstrap: str, topic: str, *, isolation_level: str = "read_uncommitted", until: bytes, within: float = 30
) -> list[bytes]:
    """Read partition 0 of *topic* from the beginning until the value *until* shows up."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(within):
            while until not in values:
                batch = await consumer.getmany(tp, timeout_ms=500)
                values.extend(r.value for r in batch.get(tp, []) if r.value is not None)
    finally:
        await consumer.stop()
    return values


async def test_broker_answers_metadata(kafka_bootstrap: str) -> None:
    """The session broker answers a metadata request that lists exactly one broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    assert len(cluster["brokers"]) == 1


async def test_produce_consume_round_trip(kafka_bootstrap: str, topic_factory: Callable[..., str]) -> None:
    """100 records produced to a fresh 3-partition topic all come back to a consumer group, from all 3."""
    topic = topic_factory(partitions=3)
    expected = {f"value-{i}".encode() for i in range(100)}

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for i in range(100):
            await producer.send(topic, value=f"value-{i}".encode(), key=f"key-{i}".encode(), partition=i % 3)
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"round-trip-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: dict[bytes, int] = {}
    try:
        async with asyncio.timeout(60):
            while len(seen) < len(expected):
                batch = await consumer.getmany(timeout_ms=500)
                for tp, records in batch.items():
                    seen.update((r.value, tp.partition) for r in records if r.value is not None)
    finally:
        await consumer.stop()
    assert set(seen) == expected
    assert set(seen.values()) == {0, 1, 2}


async def test_transactions_read_committed(kafka_bootstrap: str, topic_factory: Callable[..., str]) -> None:
    """A committed transaction is visible to a read_committed consumer while an aborted one is not."""
    topic = topic_factory(partitions=1)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"byzguard-test-{uuid.uuid4().hex[:8]}"
    )
    await producer.start()
    try:
        async with producer.transaction():
            for i in range(5):
                await producer.send(topic, f"committed-{i}".encode())
        await producer.begin_transaction()
        for i in range(5):
            await producer.send(topic, f"aborted-{i}".encode())
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, b"end")
    finally:
        await producer.stop()

    committed = [f"committed-{i}".encode() for i in range(5)]
    aborted = [f"aborted-{i}".encode() for i in range(5)]
    read_committed = await _read_partition(kafka_bootstrap, topic, isolation_level="read_committed", until=b"end")
    assert read_committed == [*committed, b"end"]
    read_uncommitted = await _read_partition(kafka_bootstrap, topic, until=b"end")
    assert set(aborted) <= set(read_uncommitted)  # they were written, just never committed


@needs_jvm
def test_ensure_broker_jars_reuses_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second ensure_broker_jars call returns the cached jars at once without running Maven."""
    version = resolve_version(None)
    lib = ensure_broker_jars(version)  # fetches only if no broker of this version ran yet

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a cached version must not run a subprocess: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    started = time.perf_counter()
    again = ensure_broker_jars(version)
    elapsed = time.perf_counter() - started
    assert again == lib
    assert (lib / f"kafka_2.13-{version}.jar").is_file()
    assert elapsed < 2.0


@needs_jvm
async def test_restart_on_data_dir_of_killed_broker(tmp_path: Path) -> None:
    """A broker started on the data dir a SIGKILLed broker left behind comes up and still has its records."""
    version = resolve_version(None)
    data_dir = tmp_path / "data"
    topic = f"survivor-{uuid.uuid4().hex[:8]}"

    first = LocalKafka(version, data_dir=data_dir, jvm_flags=FAST_START_JVM_FLAGS)
    await asyncio.to_thread(first.start)
    try:
        producer = AIOKafkaProducer(bootstrap_servers=first.bootstrap_servers, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"kept", partition=0)  # auto-creates the topic
        finally:
            await producer.stop()
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
    finally:
        await asyncio.to_thread(first.stop)  # reaps the killed JVM; leaves .lock and the data behind

    assert (data_dir / ".lock").exists()
    second = LocalKafka(version, data_dir=data_dir, jvm_flags=FAST_START_JVM_FLAGS)
    await asyncio.to_thread(second.start)
    try:
        assert not second.reformatted, "the data dir of a killed broker must be reused, not reformatted"
        values = await _read_partition(second.bootstrap_servers, topic, until=b"kept")
        assert values == [b"kept"]
    finally:
        await asyncio.to_thread(second.stop)


def test_ensure_running_says_it_reuses_a_broker_instead_of_starting_one(kafka_bootstrap: str, tmp_path: Path) -> None:
    """With a Kafka broker already answering on the port, ensure_running announces that it uses it, and starts
    nothing."""
    host, _, port = kafka_bootstrap.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        pytest.skip("the session's broker is not on this host")
    said: list[str] = []
    assert ensure_running(port=int(port), data_dir=tmp_path / "data", announce=said.append) == f"127.0.0.1:{port}"
    assert said == [f"using the Kafka broker that already answers on 127.0.0.1:{port}"]
