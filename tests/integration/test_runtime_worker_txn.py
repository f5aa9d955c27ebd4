"""BYZGUARD_EOS_TRANSACTIONS=worker (app/runtime/worker_txn.py) on the real broker: the batches of one step share
one transaction, committed under the group membership of their fetch; a membership the group moved past is
refused, the whole transaction aborted (none of its records visible to a read_committed reader), and the worker's
producer goes on with the next transaction. (The runtime in this mode: the hand-over and crash tests,
tests/integration/test_runtime_batched.py, tests/chaos/test_crash.py, `worker` cases.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import TopicPartition

from app.runtime.batches import RecordBatches
from app.runtime.fencing import GroupMetadata, OffsetsFencedError, group_metadata, stable_committed
from app.runtime.worker_txn import WorkerTransactions
from tests.conftest import TopicFactory
from tests.integration.test_fencing import _committed_values, _member, _wait_for, stop_after  # noqa: F401

pytestmark = pytest.mark.kafka


async def _step(shared: WorkerTransactions, output: str, values: list[bytes],
                offsets: list[dict[TopicPartition, int]], membership: GroupMetadata) -> list[Any]:
    """One step's batches (one record and one input offset each) in flight together; each one's outcome."""
    batches = []
    for value in values:
        out = RecordBatches(shared.producer)
        out.add(output, 0, None, value)
        batches.append(out)
    return await asyncio.gather(*(shared.transact(out, offs, membership) for out, offs in zip(batches, offsets,
                                                                                                 strict=True)),
                                return_exceptions=True)


async def test_a_steps_batches_share_one_fenced_transaction(
        kafka_bootstrap: str, topic_factory: TopicFactory, stop_after: Callable[[Any], Any]) -> None:  # noqa: F811
    topic, output = topic_factory(2), topic_factory(1, suffix="out")
    group = f"{topic}-group"
    first = stop_after(await _member(kafka_bootstrap, topic, group))
    old = group_metadata(first)
    shared = await WorkerTransactions.started(topic, "w1", kafka_bootstrap, [topic, output], {})
    stop_after(shared)
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)

    # Two batches of one step: one transaction, both offsets committed with it.
    done = await _step(shared, output, [b"a", b"b"], [{tp0: 3}, {tp1: 4}], old)
    assert [type(r) for r in done] == [dict, dict]
    assert shared.transactions == 1 and shared.members == 2
    assert (await stable_committed(first, [tp0, tp1])).offsets == {tp0: 3, tp1: 4}

    # A second member joins: the first one's old generation is refused; neither batch's record nor offset stays.
    second = stop_after(await _member(kafka_bootstrap, topic, group))
    await _wait_for(lambda: group_metadata(first).generation_id > old.generation_id
                    and group_metadata(second).generation_id == group_metadata(first).generation_id,
                    "both members in the next generation")
    done = await _step(shared, output, [b"old-1", b"old-2"], [{tp0: 5}, {tp1: 6}], old)
    assert [type(r) for r in done] == [OffsetsFencedError, OffsetsFencedError], done
    assert (await stable_committed(second, [tp0, tp1])).offsets == {tp0: 3, tp1: 4}

    # A membership aiokafka reset (no generation, no member id) is refused before anything is sent.
    done = await _step(shared, output, [b"reset"], [{tp0: 7}], GroupMetadata(group, -1, ""))
    assert [type(r) for r in done] == [OffsetsFencedError], done

    # The producer goes on: the current generation's step commits.
    current = group_metadata(first)
    done = await _step(shared, output, [b"current"], [{tp0: 8}], current)
    assert [type(r) for r in done] == [dict], done
    assert (await stable_committed(second, [tp0, tp1])).offsets == {tp0: 8, tp1: 4}
    assert await _committed_values(kafka_bootstrap, output) == [b"a", b"b", b"current"]
