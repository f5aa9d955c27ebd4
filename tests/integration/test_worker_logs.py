"""What a worker logs on the real broker: no false livelock alarm under exactly_once, and a broker outage that is
reported once and whose end is reported."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.integration.worker_harness import Events, WorkerFactory, produce

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def test_no_livelock_alarm_while_transactions_commit(worker_factory: WorkerFactory) -> None:
    """Under exactly_once, a worker processing and committing events never logs faust's "Has not committed ... (report
    as bug)": its transactional commits count as commits (livelock timeout cut to 3 s to see it within the test)."""
    route = worker_factory.configure(partitions=2)
    worker = worker_factory.new_worker("w1")
    worker.env["BYZGUARD_LIVELOCK_TIMEOUT"] = "3"
    worker.start()
    await asyncio.to_thread(worker.wait_ready)
    events = Events()
    deadline = time.monotonic() + 12
    version = 0
    while time.monotonic() < deadline:
        version += 1
        await produce(worker_factory.bootstrap, route.input, [events.clean(f"ord-{version % 4}", version // 4 + 1)])
        await asyncio.sleep(0.2)
    assert worker.events_processed() >= version - 5, worker.log_tail()
    log = worker.log_text()
    assert "Has not committed" not in log, worker.log_tail()
