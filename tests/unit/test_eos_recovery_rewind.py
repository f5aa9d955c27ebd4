"""app.eos.rewind_recovery: after faust's seek to the committed offsets in the middle of table recovery (its fetch
loop drops what a fetch returned while the flow was stopped), the changelog partitions still being recovered are
sent back to the last record recovery applied, so the records that fetch dropped come again."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

from faust.types import TP

from app import eos

STATE = TP("bg-orders-state_by_entity-changelog", 2)
LAMPORT = TP("bg-orders-lamport_by_source-changelog", 2)
DONE = TP("bg-orders-state_by_entity-changelog", 0)
EMPTY = TP("bg-orders-lamport_by_source-changelog", 0)


class Seeks:
    """A consumer that records the seeks it is asked for."""

    def __init__(self) -> None:
        self.seeks: list[tuple[TP, int]] = []

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


def app_in(in_recovery: bool) -> Any:
    recovery = SimpleNamespace(
        in_recovery=in_recovery, active_tps={STATE, LAMPORT, DONE, EMPTY},
        # Last applied offsets (-1: none yet) and highwaters (the offset of the last record; -1: empty).
        active_offsets=Counter({STATE: 4, LAMPORT: -1, DONE: 8, EMPTY: -1}),
        active_highwaters=Counter({STATE: 8, LAMPORT: 0, DONE: 8, EMPTY: -1}))
    return SimpleNamespace(tables=SimpleNamespace(_recovery=recovery))


async def test_changelog_partitions_still_behind_are_sent_back_to_the_last_applied_record() -> None:
    """During recovery, each changelog partition below its highwater is sought to its last applied record (recovery
    skips it) or to its start; finished and empty ones are left alone."""
    consumer = Seeks()
    await eos.rewind_recovery(app_in(True), consumer)
    assert sorted(consumer.seeks) == sorted([(STATE, 4), (LAMPORT, 0)])


async def test_a_seek_outside_recovery_leaves_the_changelogs_alone() -> None:
    """Outside recovery (the stream partitions' seek at its end, or any later one) no changelog partition moves."""
    consumer = Seeks()
    await eos.rewind_recovery(app_in(False), consumer)
    assert consumer.seeks == []
