"""bench.fetching on the real broker: the faust pass-through of the benchmark (variant b) fetches with the worker's
fetch settings, as byzguard does, not with the wait faust hard-codes (1500 ms; bench/fetching.py)."""

from __future__ import annotations

from pathlib import Path

import faust
import pytest

from bench.fetching import tune_fetch
from tests.conftest import TopicFactory, unique_name


async def _started_fetcher(bootstrap: str, topic: str, datadir: Path, **tuning: int) -> tuple[faust.App, object]:
    app = faust.App(unique_name("fetching", bootstrap), broker=f"kafka://{bootstrap}", datadir=str(datadir),
                    autodiscover=False, env={}, web_enabled=False, consumer_auto_offset_reset="earliest")
    if tuning:
        tune_fetch(app, **tuning)

    @app.agent(app.topic(topic, value_serializer="raw"), name="idle")
    async def idle(stream: faust.StreamT[bytes]) -> None:
        async for _ in stream:
            pass

    await app.start()
    consumer: object = app.consumer._thread._ensure_consumer()  # type: ignore[attr-defined]
    return app, consumer._fetcher  # type: ignore[attr-defined]


@pytest.mark.parametrize(("tuning", "expected"), [
    ({"min_bytes": 4096, "max_wait_ms": 25}, (4096, 25)),
    ({}, (1, 1500)),  # what faust does without it
])
async def test_the_worker_consumer_fetches_with_the_tuned_settings(
        kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path,
        tuning: dict[str, int], expected: tuple[int, int]) -> None:
    app, fetcher = await _started_fetcher(kafka_bootstrap, topic_factory(), tmp_path, **tuning)
    try:
        assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == expected  # type: ignore[attr-defined]
    finally:
        await app.stop()


def test_tuning_after_the_consumer_exists_is_refused(tmp_path: Path) -> None:
    app = faust.App("late", broker="kafka://127.0.0.1:9", datadir=str(tmp_path), autodiscover=False, env={})
    app.consumer  # noqa: B018 - creating it is the point
    with pytest.raises(RuntimeError, match="before the app's consumer is created"):
        tune_fetch(app, min_bytes=1, max_wait_ms=10)
