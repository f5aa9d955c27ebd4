"""What a worker logs on the real broker: a broker outage that is reported once and whose end is reported."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from app.dev.localkafka import FAST_START_JVM_FLAGS, LocalKafka, resolve_version
from tests.integration.worker_harness import Events, WorkerFactory, produce

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


needs_jvm = pytest.mark.usefixtures("jvm")  # java and mvn, or the test fails (tests/conftest.py)


@needs_jvm
async def test_a_broker_outage_is_logged_once_and_its_end_is_logged(tmp_path: Path) -> None:
    """A private broker stopped for 20 s under a running worker: the worker writes a few lines about it (not
    thousands), one line saying it recovered, and goes on verifying events afterwards."""
    version = resolve_version(None)
    data_dir = tmp_path / "kafka"
    broker = LocalKafka(version, data_dir=data_dir, jvm_flags=FAST_START_JVM_FLAGS)
    await asyncio.to_thread(broker.start)
    port, controller_port = broker.port, broker.controller_port
    factory = WorkerFactory(broker.bootstrap_servers, tmp_path / "workers", "outage")
    (tmp_path / "workers").mkdir()
    try:
        route = factory.configure(partitions=2)
        worker = await asyncio.to_thread(factory.start, "w1")
        events = Events()
        await produce(broker.bootstrap_servers, route.input, [events.clean("ord-1", v) for v in (1, 2)])
        await _processed(worker, 2)
        before = len(worker.log_text())

        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(20)
        broker = LocalKafka(version, data_dir=data_dir, port=port, controller_port=controller_port,
                            jvm_flags=FAST_START_JVM_FLAGS)
        await asyncio.to_thread(broker.start)
        await produce(broker.bootstrap_servers, route.input, [events.clean("ord-1", 3)])
        await _processed(worker, 3, within=120)
        deadline = time.monotonic() + 60
        while "recovered: no more" not in worker.log_text()[before:]:
            assert time.monotonic() < deadline, worker.log_tail(200)
            await asyncio.sleep(1)
    finally:
        await asyncio.to_thread(factory.cleanup)
        await asyncio.to_thread(broker.stop)
    outage = worker.log_text()[before:].splitlines()
    loud = [line for line in outage if "[ERROR]" in line or "[WARNING]" in line]
    assert 0 < len(loud) <= 40, "\n".join(loud[:80])


async def _processed(worker: Any, n: int, *, within: float = 60) -> None:
    """Wait until the worker has processed `n` events."""
    deadline = time.monotonic() + within
    while (worker.events_processed() or 0) < n:
        assert worker.alive(), worker.log_tail()
        assert time.monotonic() < deadline, worker.log_tail()
        await asyncio.sleep(0.5)
