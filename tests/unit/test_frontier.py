"""How far each audit source partition was drained into each join partition, from end and committed offsets
(byzguard/frontier.py)."""

from __future__ import annotations

from byzguard.frontier import MAX_MARKS, TP, Frontier

IN, OUT, J0, J1 = ("in", 0), ("out", 0), ("rep", 0), ("rep", 1)
SOURCE = OUT


def frontier() -> Frontier:
    """One source partition: no first stage, the verify stage's input `in`[0], the verified partition, two joins."""
    return Frontier({SOURCE: (frozenset(), frozenset({IN}), frozenset({OUT}), frozenset({J0, J1}))})


def read(front: Frontier, at: float, ends: dict[TP, int], committed: dict[TP, int]) -> None:
    """One round of reads as the runtime makes it: a mark, then per level its end offsets, then its committed
    ones (here from fixed maps: what the broker says during the round)."""
    front.begin(at)
    for level in range(front.depth):
        wanted = front.wanted(level)
        front.ends(level, {tp: o for tp, o in ends.items() if tp in wanted})
        front.committed(level, {tp: o for tp, o in committed.items() if tp in wanted})


def test_a_source_everything_of_which_was_joined_is_drained_through_the_time_the_round_began() -> None:
    """When every stage has committed up to its end, one round follows the mark down the chain: the source is
    drained into each join partition through the time the round began."""
    front = frontier()
    read(front, 100.0, {IN: 5, OUT: 9, J0: 3, J1: 4}, {IN: 5, OUT: 9, J0: 3, J1: 4})
    assert front.through == {(SOURCE, J0): 100.0, (SOURCE, J1): 100.0}


def test_a_record_stuck_at_any_stage_holds_the_source_until_it_passes() -> None:
    """A verify input not consumed to its end (its record held in a failing delivery), or a verified partition the
    forward stage has not read, keeps the source from being drained through any later time; once it passes, the
    join partitions that read their part are, each on its own."""
    front = frontier()
    for at in (100.0, 110.0, 120.0):
        read(front, at, {IN: 5, OUT: 9, J0: 3, J1: 4}, {IN: 4, OUT: 9, J0: 3, J1: 4})
    assert front.through == {}
    read(front, 130.0, {IN: 6, OUT: 10, J0: 3, J1: 5}, {IN: 5, OUT: 9, J0: 3, J1: 4})
    assert front.through == {}  # the marks of 100..120 passed the input; the verified partition's end moved on
    read(front, 140.0, {IN: 6, OUT: 10, J0: 3, J1: 5}, {IN: 6, OUT: 10, J0: 3, J1: 4})
    assert front.through == {(SOURCE, J0): 140.0}  # every mark passed; J1 has a record to join still
    read(front, 150.0, {IN: 6, OUT: 10, J0: 3, J1: 5}, {IN: 6, OUT: 10, J0: 3, J1: 5})
    assert front.through == {(SOURCE, J0): 150.0, (SOURCE, J1): 150.0}


def test_end_offsets_are_taken_when_a_mark_reaches_a_level_not_before() -> None:
    """A level's end offsets are those read after the level before was seen committed: records the verify stage
    wrote meanwhile are waited for. A round that gets no answer (the broker out of reach) moves nothing."""
    front = frontier()
    read(front, 100.0, {IN: 5, OUT: 9}, {IN: 4, OUT: 9})  # the verified partition's end 9: not taken yet
    read(front, 110.0, {IN: 5, OUT: 10, J0: 0, J1: 0}, {IN: 5, OUT: 9})  # the input's record was verified: 10
    assert front.through == {}
    front.begin(120.0)  # a round whose reads all fail
    read(front, 130.0, {IN: 5, OUT: 10, J0: 0, J1: 0}, {IN: 5, OUT: 10})
    assert front.through == {(SOURCE, J0): 130.0, (SOURCE, J1): 130.0}


def test_a_partition_never_committed_passes_only_while_it_never_had_a_record() -> None:
    """The group has no offset of a partition it never consumed from: that counts as 0, which passes an empty
    partition (a source that never had a record is drained) and holds one with records."""
    front = frontier()
    read(front, 100.0, {IN: 0, OUT: 0, J0: 0, J1: 0}, {})
    assert front.through == {(SOURCE, J0): 100.0, (SOURCE, J1): 100.0}
    read(front, 110.0, {IN: 1, OUT: 0, J0: 0, J1: 0}, {})
    assert front.through == {(SOURCE, J0): 100.0, (SOURCE, J1): 100.0}


def test_a_stalled_source_keeps_at_most_a_bounded_number_of_marks() -> None:
    """A source stuck for many rounds keeps its oldest MAX_MARKS marks and starts no more: when it passes, the
    oldest of them drain it first, and new marks start again."""
    front = frontier()
    for at in range(100, 100 + 10 * (MAX_MARKS + 5), 10):
        read(front, float(at), {IN: 5}, {IN: 4})
    assert len(front._marks[SOURCE]) == MAX_MARKS
    read(front, 1000.0, {IN: 5, OUT: 0, J0: 0, J1: 0}, {IN: 5})
    assert front.through[(SOURCE, J0)] == 170.0  # the newest mark kept; the round's own found the cap full
    read(front, 1010.0, {IN: 5, OUT: 0, J0: 0, J1: 0}, {IN: 5})
    assert front.through[(SOURCE, J0)] == 1010.0

