"""The test harness deletes the topics a test claimed, and only those."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.conftest import _delete_claimed

pytestmark = pytest.mark.kafka


async def test_claimed_prefixes_are_deleted_and_nothing_else(kafka_bootstrap: str) -> None:
    """Every topic named with a claimed prefix goes in one call; a topic that only shares the kind stays."""
    run = uuid.uuid4().hex[:8]
    claimed, other = f"cleanup-{run}", f"cleanup-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        made = (claimed, f"{claimed}-receipts", other)
        await admin.create_topics([NewTopic(name, 1, 1) for name in made])
        for _ in range(100):  # listed, as a test's topics are by its end
            if set(made) <= set(await admin.list_topics()):
                break
            await asyncio.sleep(0.1)
        await _delete_claimed(kafka_bootstrap, {claimed})
        for _ in range(100):  # the deletion reaches the metadata a moment later
            left = {name for name in await admin.list_topics() if name.startswith("cleanup-")}
            if claimed not in left and f"{claimed}-receipts" not in left:
                break
            await asyncio.sleep(0.1)
        assert claimed not in left and f"{claimed}-receipts" not in left
        assert other in left
    finally:
        await admin.delete_topics([other])
        await admin.close()
