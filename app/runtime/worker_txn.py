"""exactly_once with one transaction per worker step (BYZGUARD_EOS_TRANSACTIONS=worker, opt-in): every route
partition's batch put in flight by one step goes into one transaction of the worker's own transactional producer,
fenced through the consumer group (KIP-447, app/runtime/fencing.py; docs/kip447-fencing.md).

- **One producer per worker**, transactional id `<app_id>-batched-worker-<client id>` (`worker_transactional_id`):
  the client id is the worker's name or its data dir's instance id (app/runtime/membership.py), the same for every
  process of that worker and never that of another live worker (two on one data dir cannot open its RocksDB; two
  of one name are one worker, the later one removes the earlier from the group). Its start (InitProducerId)
  aborts what a previous process of the same worker left open.
- **One transaction per step**: the batches put in flight within GRACE_TURNS turns of the loop of the first
  (those of one step, `BatchedRuntime._step`, and those the landing of the previous transaction releases) join
  it; each sends its records (outputs, then changelog records) as it comes; once every member has sent and every
  record batch is acknowledged, the offsets of all members go in with `fencing.add_offsets` under the group
  membership taken when their records were fetched (a rebalance in between refuses them), then the commit. Batches
  put in flight while a transaction commits wait for it and open the next. Each partition still has one batch in
  flight at most, so its outputs, changelog records and stores keep their order.
- **Fenced** (`fencing.OffsetsFencedError`: the group moved on): the transaction is aborted (EndTxn ABORT), no
  member's state reaches RocksDB (`BatchedRuntime._fly` discards it), and the worker goes on: its partitions are
  revoked by the rebalance that fenced it. A membership aiokafka already reset (generation -1, no member id) is
  refused here, before anything is sent: the broker would take such offsets unfenced.
- Any other failure aborts the transaction and fails every member: the worker stops, as under the per-partition
  mode.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from app.runtime import fencing
from app.runtime.batches import RecordBatches, Sent, delivered
from app.runtime.stages import abort, begin, transactional_producer

log = logging.getLogger(__name__)

#: Turns of the loop a transaction stays open for more batches after its first one went in flight: the batches
#: of one step are put in flight one after another within a turn or two (`_finish` of each route partition).
GRACE_TURNS = 3
#: The worker producer's transaction timeout (ms). The broker aborts a transaction open longer than this (the
#: worker then gets ProducerFenced and stops), so it must exceed the longest step's transaction: begin to EndTxn,
#: at most one step's processing (bounded by batch_max_ms per partition batch, 100 ms) plus the sends and five
#: round trips; under load at 8,700 ev/s they took ~0.1 s at p50 and ~1 s at the worst seen (bench/results/
#: dlat-1834870). 20 s leaves a wide margin for a loaded machine, and bounds how long a worker that dies and does
#: not come back on its data dir or name holds its partitions' new owners (their require_stable wait) and the
#: read_committed readers of what it wrote: the timeout plus up to the broker's 10-s abort check interval
#: (docs/kip447-fencing.md, test d), where aiokafka's default of 60 s would hold them up to 70 s.
TRANSACTION_TIMEOUT_MS = 20_000


def worker_transactional_id(app_id: str, client_id: str) -> str:
    """The transactional id of a worker's producer under BYZGUARD_EOS_TRANSACTIONS=worker."""
    return f"{app_id}-batched-worker-{client_id}"


class _Group:
    """The batches of one open transaction."""

    def __init__(self, membership: fencing.GroupMetadata) -> None:
        self.membership = membership
        self.sent: list[Sent] = []
        self.offsets: dict[TopicPartition, int] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.members = 0
        self.sending = 0
        self.sent_all = asyncio.Event()


class WorkerTransactions:
    """The worker's transactional producer and its one open transaction (see the module doc)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.open: _Group | None = None
        self.committing: asyncio.Future[None] | None = None
        #: Transactions committed, and the batches they held (the log line at stop).
        self.transactions = 0
        self.members = 0

    @classmethod
    async def started(cls, app_id: str, client_id: str, bootstrap: str, topics: list[str],
                      options: dict[str, Any]) -> WorkerTransactions:
        """The worker's producer, started: its InitProducerId aborts what a previous process of this worker left
        open; its offsets go with TxnOffsetCommit v3 (`fencing.fence_offsets`)."""
        producer = transactional_producer(bootstrap, worker_transactional_id(app_id, client_id), topics,
                                          {**options, "transaction_timeout_ms": TRANSACTION_TIMEOUT_MS})
        fencing.fence_offsets(producer)
        await producer.start()
        return cls(producer)

    async def stop(self) -> None:
        if self.committing is not None and not self.committing.done():
            await asyncio.wait([self.committing])
        log.info("batched runtime: %d worker transactions held %d batches", self.transactions, self.members)
        await self.producer.stop()

    async def transact(self, out: RecordBatches, offsets: dict[TopicPartition, int],
                       membership: fencing.GroupMetadata) -> dict[tuple[str, int], int]:
        """One route partition's batch (its outputs and changelog records in `out`, the next input `offsets`) in
        the worker's transaction, under the group `membership` of its records' fetch; returns once that
        transaction committed, what `RecordBatches.deliver` returns. Raises where it failed (aborted):
        `fencing.OffsetsFencedError` where the group refused its offsets."""
        while self.open is None and self.committing is not None and not self.committing.done():
            await asyncio.wait([self.committing])
        group = self.open
        if group is None or group.membership != membership:
            if group is not None:  # another generation (a revoke lands every batch first: not expected)
                await asyncio.wait([group.done])
                return await self.transact(out, offsets, membership)
            await begin(self.producer)
            group = self.open = _Group(membership)
            self.committing = asyncio.ensure_future(self._close(group))
            self.committing.add_done_callback(_retrieved)
        group.members += 1
        group.offsets.update(offsets)
        group.sending += 1
        try:
            sent = await out.send()
        finally:
            group.sending -= 1
            if not group.sending:
                group.sent_all.set()
        group.sent.extend(sent)
        await asyncio.shield(group.done)
        return delivered(sent)

    async def _close(self, group: _Group) -> None:
        """Close `group` to new batches after GRACE_TURNS, then commit it once every record batch of it is
        acknowledged: its offsets (fenced), then EndTxn; abort it where anything failed."""
        try:
            for _ in range(GRACE_TURNS):
                await asyncio.sleep(0)
            self.open = None  # later batches wait for this commit, then open the next transaction
            while group.sending:
                group.sent_all.clear()
                await group.sent_all.wait()
            futs = [fut for *_, fut in group.sent]
            if futs:
                await asyncio.wait(futs)
            delivered(group.sent)  # raises where a batch was not delivered
            manager = self.producer._txn_manager
            registered = None
            if group.offsets:
                membership = group.membership
                if membership.generation_id < 0 or not membership.member_id:
                    raise fencing.OffsetsFencedError(
                        f"no group membership (generation {membership.generation_id}, member "
                        f"{membership.member_id!r}) when these records were fetched: not committed")
                registered = fencing.add_offsets(self.producer, group.offsets, membership)
            manager.committing_transaction()
            end = manager.wait_for_transaction_end()
            end.add_done_callback(_retrieved)  # refused offsets fail it too: theirs is raised
            if registered is not None:
                await asyncio.shield(registered)
            await asyncio.shield(end)
            self.transactions += 1
            self.members += group.members
            group.done.set_result(None)
        except BaseException as exc:
            if self.open is group:
                self.open = None
            await abort(self.producer)
            group.done.set_exception(exc)
            group.done.add_done_callback(_retrieved)
            raise


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
