"""How far each source partition of the audits has been drained into each join partition, from offsets alone.

A record of a verified partition reaches an audit's join through a chain of stages, each a consumer of the
worker group committing the offsets it has processed: (a repartitioning route's forward stage: every partition
of the route's inputs), the verify stage (the route's input partitions, or its repartition partition, of the
verified partition's number), the audit's forward stage (the verified partition), the join (each partition of
the rule's repartition topic). A `Frontier` follows marks down such chains: a mark started at wall time `at`
takes the end offsets of the chain's first level; once the group's committed offsets reach them, every record
that reached that level before `at` is past it, and the mark takes the end offsets of the next level, read after
that commit was seen, and so on. A mark past the last level for a join partition says: every record of the
source that entered the pipeline before `at` has been joined there, so the source's progress in that join may
be `at` (`byzguard.audit.Watermark.drained`), however quiet it is, and on whichever worker each stage runs.

It is read from the offsets of every stage (`wanted`), level by level and in order per level: the end offsets
(`ends`), then the committed ones (`committed`), so a level's end offsets are always read after the commit of the
level before was seen. A read that fails leaves the marks where they are: the sources hold their joins' windows
open (late reports, never a false `missing`). Pure: the runtime (app/runtime/watermarks.py) does the reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: A topic partition: (topic, partition).
TP = tuple[str, int]

#: The most marks under way per source: a stalled source keeps its oldest ones and starts no more.
MAX_MARKS = 8


@dataclass(slots=True)
class _Mark:
    at: float
    level: int = 0
    #: Per topic partition of its level, the end offset every commit must reach; None: not read yet.
    targets: dict[TP, int] | None = None


@dataclass(slots=True)
class Frontier:
    """Marks down each source's chain of stages (see the module doc). `chains`: per source partition, the topic
    partitions of each level, the last level being the join partitions it feeds (an empty level is passed at
    once); every chain has the same number of levels."""

    chains: Mapping[TP, Sequence[frozenset[TP]]]
    #: Per (source, join partition), the wall time up to which the source was drained into it.
    through: dict[tuple[TP, TP], float] = field(default_factory=dict)
    _marks: dict[TP, list[_Mark]] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """The number of levels of every chain."""
        return max((len(levels) for levels in self.chains.values()), default=0)

    def begin(self, at: float) -> None:
        """Start a mark at wall time `at` (just before the first level's end offsets are read) on every source
        with fewer than MAX_MARKS under way."""
        for source in self.chains:
            marks = self._marks.setdefault(source, [])
            if len(marks) < MAX_MARKS:
                marks.append(_Mark(at))

    def wanted(self, level: int) -> set[TP]:
        """The topic partitions whose end and committed offsets `level` needs now."""
        return {tp for source, marks in self._marks.items() if any(m.level == level for m in marks)
                for tp in self.chains[source][level]}

    def ends(self, level: int, ends: Mapping[TP, int]) -> None:
        """The end offsets of `level`'s partitions, read now: the marks that entered the level take them (one whose
        partitions are not all answered waits for a later read)."""
        for source, marks in self._marks.items():
            tps = self.chains[source][level]
            for mark in marks:
                if mark.level == level and mark.targets is None and all(tp in ends for tp in tps):
                    mark.targets = {tp: ends[tp] for tp in tps}

    def committed(self, level: int, committed: Mapping[TP, int]) -> None:
        """The group's committed offsets of `level`'s partitions, read now (a partition it never committed: 0,
        which passes only a partition that never had a record): marks whose targets are reached go on to the next
        level; past the last one, they move `through` of their source for each join partition they reached."""
        last = len(next(iter(self.chains.values()))) - 1 if self.chains else 0
        for source, marks in self._marks.items():
            for mark in marks:
                if mark.level != level or mark.targets is None:
                    continue
                reached = [tp for tp, end in mark.targets.items() if committed.get(tp, 0) >= end]
                for tp in reached:
                    del mark.targets[tp]
                    if level == last:
                        key = (source, tp)
                        self.through[key] = max(self.through.get(key, mark.at), mark.at)
                if not mark.targets and level < last:
                    mark.level, mark.targets = level + 1, None
            self._marks[source] = [m for m in marks if m.level < last or m.targets is None or m.targets]
