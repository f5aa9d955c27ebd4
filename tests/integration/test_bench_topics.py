"""The benchmark's topic cleanup on the real broker: a finished run's topics go, every other topic stays."""

from __future__ import annotations

import asyncio
import uuid

from bench.kafka import create_topics, delete_topics, listed_topics
from tests.conftest import claim_topics


async def test_delete_topics_deletes_the_prefixed_topics_and_no_other(kafka_bootstrap: str) -> None:
    """Every topic starting with the run's prefix is deleted; a topic whose name only shares its start is kept."""
    base = claim_topics(kafka_bootstrap, f"bench-del-{uuid.uuid4().hex[:8]}")
    run, other = f"{base}-t-r1-", f"{base}-t-r10-out"
    mine = [f"{run}out", f"{run}verified", f"{run}state-changelog"]
    await create_topics(kafka_bootstrap, [*mine, other], 1)

    deleted = await delete_topics(kafka_bootstrap, [run])

    assert sorted(deleted) == sorted(mine)
    for _ in range(50):
        left = {t for t in await listed_topics(kafka_bootstrap) if t.startswith(base)}
        if left == {other}:
            break
        await asyncio.sleep(0.1)
    assert left == {other}


def test_keep_topics_is_off_by_default() -> None:
    """The bench deletes its topics unless told --keep-topics."""
    from bench.run import parse_args

    assert parse_args([]).keep_topics is False
    assert parse_args(["--keep-topics"]).keep_topics is True
