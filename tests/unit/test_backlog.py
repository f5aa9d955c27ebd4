"""The quarantine backlog a worker reports: records of its own quarantine partitions, by review status."""

from __future__ import annotations

from app.backlog import BacklogCounts, split_quarantine_id
from byzguard.review import Action, DecisionEntry, DecisionRecord


def decision(qid: str, *actions: Action) -> bytes:
    """A decisions-topic value whose history is `actions`."""
    return DecisionRecord(qid, "prices", tuple(DecisionEntry(a, "alice", 1.0) for a in actions)).to_bytes()


def test_quarantine_ids_split_into_topic_partition_offset() -> None:
    """`<topic>-<partition>-<offset>` splits from the right, so topics may contain dashes; junk is None."""
    assert split_quarantine_id("my-prices.quarantine-3-17") == ("my-prices.quarantine", 3, 17)
    assert split_quarantine_id("nonsense") is None
    assert split_quarantine_id("t-x-1") is None


def test_pending_is_quarantined_minus_decided_in_owned_partitions() -> None:
    """Pending counts records read in owned partitions that have no decision; decided ones count by status."""
    counts = BacklogCounts({"q": "prices"})
    assert sorted(counts.own({("q", 0), ("q", 1)})) == [("q", 0), ("q", 1)]
    for offset in (3, 5, 8):  # quarantine ids name the input record: topic "in", same partition
        counts.add_record("q", 0, f"in-0-{offset}")
    counts.add_record("q", 1, "in-1-0")
    counts.add_record("q", 2, "in-2-0")  # not owned: not counted
    counts.add_decision(b"in-0-5", decision("in-0-5", Action.APPROVE))
    counts.add_decision(b"in-0-8", decision("in-0-8", Action.APPROVE, Action.REPLAYED))
    counts.add_decision(b"in-2-0", decision("in-2-0", Action.REJECT))  # another worker's record
    counts.add_decision(b"in-0-1", decision("in-0-1", Action.REJECT))  # before the first record read (expired)
    counts.add_decision(b"in-0-9", decision("in-0-9", Action.REJECT))  # not read yet
    assert counts.by_route() == {"prices": {"pending": 2, "approved": 1, "rejected": 0, "replayed": 1,
                                            "rechecked": 0}}


def test_revoked_partitions_leave_the_count_and_new_ones_start_over() -> None:
    """A partition given up is no longer counted; one (re)gained is read again from its beginning."""
    counts = BacklogCounts({"q": "prices"})
    counts.own({("q", 0), ("q", 1)})
    counts.add_record("q", 0, "in-0-0")
    counts.add_record("q", 1, "in-1-0")
    assert counts.own({("q", 1), ("q", 2)}) == [("q", 2)]
    assert counts.by_route()["prices"]["pending"] == 1
    counts.add_decision(b"in-1-0", decision("in-1-0", Action.REJECT))
    assert counts.by_route()["prices"]["rejected"] == 1
    counts.add_decision(b"in-1-0", None)  # a tombstone undoes the decision
    assert counts.by_route()["prices"]["pending"] == 1
