"""A broker outage is waited out: a worker on a broker of its own keeps running while the broker is frozen (SIGSTOP)
for 20 s in the middle of a stream, and afterwards every event is verified (once, under exactly_once)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.dev.localkafka import FAST_START_JVM_FLAGS, LocalKafka
from tests.integration.worker_harness import Events, WorkerFactory, by_id, collect, produce, wait_caught_up

pytestmark = [pytest.mark.slow]

OUTAGE_SECONDS = 20.0


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A broker only this module's tests use, one after the other (each freezes it for a while): the shared one
    must never stop."""
    kafka = LocalKafka(fresh=True, data_dir=tmp_path_factory.mktemp("kafka") / "data", jvm_flags=FAST_START_JVM_FLAGS)
    with kafka:
        yield kafka


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_a_frozen_broker_is_waited_out_and_nothing_is_lost(own_broker: LocalKafka, tmp_path: Path,
                                                                 guarantee: str) -> None:
    """Events flow while the broker freezes for 20 s: the worker never stops, and every event is verified
    (exactly once under exactly_once)."""
    bootstrap = own_broker.bootstrap_servers
    factory = WorkerFactory(bootstrap, tmp_path, "outage", processing_guarantee=guarantee)
    try:
        route = factory.configure(partitions=2)
        worker = factory.start("w1", timeout=120)
        events = Events()
        batches = [[events.clean(f"acct-{i}", v) for i in range(40)] for v in range(1, 11)]

        async def stream() -> None:
            for batch in batches:
                await produce(bootstrap, route.input, batch)
                await asyncio.sleep(0.3)

        sender = asyncio.ensure_future(stream())
        await asyncio.sleep(1.5)
        pid = own_broker._pid  # the broker process this fixture started
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            while time.monotonic() - frozen_at < OUTAGE_SECONDS:
                await asyncio.sleep(0.5)
                assert worker.alive(), worker.fail("stopped during the outage")
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.wait_for(sender, 120)
        await wait_caught_up(bootstrap, factory.app_id, [route.input], workers=[worker], timeout=180)
        assert worker.alive(), worker.fail("stopped after the outage")
        assert worker.log_text().count("===== w1 starting at") == 1
        sent = {s.event_id for batch in batches for s in batch}
        verified = by_id(await collect(bootstrap, route.verified, expected=len(sent)))
        missing = sorted(sent - set(verified))
        assert not missing, worker.fail(f"{len(missing)} events in no output: {missing[:5]}")
        if guarantee == "exactly_once":
            twice = sorted(i for i, records in verified.items() if len(records) > 1)
            assert not twice, f"verified more than once: {twice[:5]}"
    finally:
        factory.cleanup()
