"""The processor seam: what a runtime runs for each record of a stream and on each punctuation.

Every stateful stream of the guard goes through one small interface, as Kafka Streams' Processor API does:

- `process(record, state, now)`: one input record; reads and writes the partition's tables through `state`
  and returns what the record caused (outputs to send, in order);
- `punctuate(state, now)`: work on a timer (causal deadlines that passed, audit windows that closed), same
  state, same kind of output. `interval` says how often it must run (None: never).

Two processors implement it as thin adapters over the pure functions that decide: `VerifyProcessor` (one
route: `Guard.process`, and `Guard.expire_held` as its punctuation) and `AuditJoinProcessor` (one audit rule's
join: `byzguard.audit.expire` then `observe` per observation, `expire` of the closed windows as punctuation).
Their verdicts, codes, headers and state records are exactly those of the functions they wrap. The contract
checker (byzguard/contract/check.py) runs a sample through `VerifyProcessor` over `MemoryTable`s, the audit
agent (agents/audit.py) runs `AuditJoinProcessor` per partition of its join table.

State is a mapping from a table name (`tables`) to a `TableState`: get / put / delete / items over the
partition's keys. A runtime gives each partition its own views, which read through the writes not yet stored
(the batch's own first, then a batch still in flight, then the store): a record sees the writes of the
record before it. A processor never does I/O, never raises for a bad record, and writes nothing but through
the views; `MemoryTable` is the in-memory view.

What a runtime must call, in which order, in which transaction (per input partition):

1. On assignment: restore the partition's tables from their changelogs (read_committed, up to their end)
   before the first record is fetched; then create the partition's processor (`VerifyProcessor(guard,
   route)`, `AuditJoinProcessor(rule)`, then its `resume(state)`: the watermark its table holds). One
   processor per partition: a processor may keep bookkeeping for its partition in memory, which is rebuilt,
   not restored.
2. Per batch (the records of one fetch of the partition, in offset order), all of it inside the partition's
   transaction under exactly_once:
   a. `process(record, state, now)` for each record, `now` the wall-clock time (seconds) at which it runs;
      its outputs are sent in the order given, before those of the next record. A runtime may hand consecutive
      records to `VerifyProcessor.prepare` first (decode and MAC, one pass each over them: the same decisions,
      less CPU per record) and each record's own to `process`, in order (`process_batch` does both);
   b. then, when `interval` seconds passed since the partition's last punctuation, `punctuate(state, now)`,
      its outputs sent likewise. A partition with no records is punctuated on time all the same, in a
      transaction of its own (a causal deadline or an audit window must not wait for traffic). An audit join's
      watermark is told before, on every idle step, how far its sources were drained (`watermark.drained`), and
      it is written with the batch (`keep(state)`);
   c. the changelog records of every key the batch wrote (its last value; a delete is a tombstone), then the
      input offsets (`send_offsets_to_transaction`), then the commit;
   d. only after the commit (at_least_once: after the outputs and changelog records are acknowledged and the
      offsets committed) are the batch's writes stored in the local store, in one write batch per table. So
      the store never holds state whose outputs were not delivered, and a redelivered record is judged as it
      was the first time, never as a duplicate of itself.
   On an aborted transaction the batch's writes are dropped with it, and the processor is re-created (its
   in-memory bookkeeping may have seen the aborted records; an audit join's is `resume`d).
3. On revocation: finish and commit (or abort) the batch in flight, then drop the partition's processor
   and close its state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from byzguard.audit import AuditRule, Check, JoinState, Observation, Source, Watermark, expire, observe
from byzguard.config import Route
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, Guard, Prepared, RecordIn, Result

#: The audit join's table: per join key (its repartition record key), the JoinState bytes.
PENDING = "pending"
#: The audit join table's other keys: per side and source partition (verified topic and partition), the offset of
#: the last observation joined from it. A join key is UTF-8 text, which never holds the byte 0xFF.
SOURCE_PREFIX = b"\xffsource\x00"
#: The join table key of the partition's watermark (`repr` of a float, seconds; the stream time of the release
#: before, read as the watermark), under SOURCE_PREFIX so that a release that does not know it skips it. A table
#: without it or any source progress (written by an earlier release) resumes from the newest observation time it
#: holds; one with progress had no watermark yet, and resumes none.
CLOCK_KEY = SOURCE_PREFIX + b"clock"
#: The prefix of the join table keys of each source partition's progress (`progress_key`; `repr` of a float).
PROGRESS_PREFIX = SOURCE_PREFIX + b"at\x00"
#: A source's progress is written once it moved by more than this (seconds): not every batch under load; after a
#: restart it resumes up to this much behind (windows close that much later, never earlier).
PROGRESS_STEP = 1.0

In_contra = TypeVar("In_contra", contravariant=True)
Out_co = TypeVar("Out_co", covariant=True)


class TableState(Protocol):
    """One table of one partition, as a processor sees it: its own writes are read back at once."""

    def get(self, key: bytes) -> bytes | None:
        """The value of `key`, or None."""
        ...

    def put(self, key: bytes, value: bytes) -> None:
        """Set `key` (a changelog record at the commit)."""
        ...

    def delete(self, key: bytes) -> None:
        """Remove `key` (a changelog tombstone at the commit)."""
        ...

    def items(self) -> Iterable[tuple[bytes, bytes]]:
        """Every key of the partition's table with its value, writes not yet stored included (punctuations scan
        with it; a processor does not write while it iterates)."""
        ...


#: A partition's state: its tables by the names a processor's `tables` gives.
State = Mapping[str, TableState]


class Processor(Protocol[In_contra, Out_co]):
    """One stateful stream on one partition: records in, outputs out, state through the views."""

    @property
    def tables(self) -> tuple[str, ...]:
        """The names of the tables it reads and writes (the keys of the `state` it is given)."""
        ...

    @property
    def interval(self) -> float | None:
        """Seconds between punctuations (None: it has nothing to do on a timer)."""
        ...

    def process(self, record: In_contra, state: State, now: float) -> Out_co:
        """What one record causes; its state writes are made through `state`."""
        ...

    def punctuate(self, state: State, now: float) -> Out_co:
        """What the passing of time causes at `now` (deadlines, closed windows)."""
        ...


class MemoryTable:
    """A `TableState` over a dict (tests, a sample run without Kafka)."""

    __slots__ = ("data",)

    def __init__(self, data: dict[bytes, bytes] | None = None) -> None:
        self.data: dict[bytes, bytes] = {} if data is None else data

    def get(self, key: bytes) -> bytes | None:
        """The value of `key`, or None."""
        return self.data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        """Set `key`."""
        self.data[key] = value

    def delete(self, key: bytes) -> None:
        """Remove `key` (absent: nothing)."""
        self.data.pop(key, None)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every key with its value (a snapshot: writes during the iteration are safe)."""
        return iter(list(self.data.items()))


def memory_state(tables: Iterable[str]) -> dict[str, MemoryTable]:
    """Empty in-memory tables by name, for a processor's `tables`."""
    return {name: MemoryTable() for name in tables}


# -- the verify step -----------------------------------------------------------------------------------------

def causal_interval(route: Route) -> float | None:
    """How often a route's held records are checked against their deadline: a quarter of it, 0.5 to 5 s (the
    punctuations also refresh the buffer gauges of a restored partition); None without a causal buffer."""
    return max(0.5, min(5.0, route.causal.deadline / 4)) if route.causal.buffer else None


def _apply(result: Result, state: State) -> Result:
    for (table, key), value in result.writes.items():
        if value is None:
            state[table].delete(key)
        else:
            state[table].put(key, value)
    return result


class VerifyProcessor:
    """The verify step of one route on one partition: `Guard.process` per record, `Guard.expire_held` on time.

    Outputs are the guard's `Result` (routed records in order: the record itself, then any held records it
    released; its `writes` are already applied to `state`)."""

    __slots__ = ("guard", "interval", "route", "tables")

    def __init__(self, guard: Guard, route: Route) -> None:
        self.guard = guard
        self.route = route
        self.tables: tuple[str, ...] = (ENTITIES, LAMPORTS, CAUSAL) if route.causal.buffer else (ENTITIES, LAMPORTS)
        self.interval = causal_interval(route)

    def process(self, record: RecordIn, state: State, now: float, prepared: Prepared | None = None) -> Result:
        """Verify one record (and release what it unblocks); never raises for a bad record. `prepared`: what
        `prepare` made of this record (the same decision, sooner)."""
        return _apply(self.guard.process(record, self.route, state, now=now, prepared=prepared), state)

    def prepare(self, records: Sequence[RecordIn]) -> list[Prepared]:
        """A batch's work that needs neither the state nor the records before (Guard.prepare): decode and MAC,
        each over all the records. Then `process` each record in order with its own."""
        return self.guard.prepare(records, self.route)

    def process_batch(self, records: Sequence[RecordIn], state: State, now: float) -> list[Result]:
        """`process` of each record in order, its writes applied before the next (so the next reads them), with
        the independent work done stage by stage first (`prepare`): the same results, in less time per record."""
        return [_apply(result, state) for result in self.guard.process_batch(records, self.route, state, now)]

    def punctuate(self, state: State, now: float) -> Result:
        """Quarantine held records whose deadline passed (causal.gap); `oldest_held_age` says what still waits."""
        if not self.route.causal.buffer:
            return Result()
        return _apply(self.guard.expire_held(self.route, state, now=now), state)


# -- the audit join ------------------------------------------------------------------------------------------

@dataclass(slots=True)
class AuditOutput:
    """What an observation or a punctuation of the audit join caused: the checks completed (a discrepancy
    each, unless it passed) and the join states it could not read (dropped, with why: say so in the log)."""

    checks: list[Check] = field(default_factory=list)
    unreadable: list[tuple[bytes, str]] = field(default_factory=list)
    #: An observation joined before (at_least_once redelivered it): skipped, nothing changed.
    repeated: bool = False


def source_key(obs: Observation) -> bytes | None:
    """The join table key of the last offset joined from the observation's side and source partition (None: the
    observation does not say where it comes from)."""
    if obs.origin is None:
        return None
    topic, partition, _ = obs.origin
    return b"%s%s\x00%s\x00%d" % (SOURCE_PREFIX, obs.side.value.encode(), topic.encode(), partition)


def progress_key(source: Source) -> bytes:
    """The join table key of a source partition's progress (its verified topic and partition)."""
    return b"%s%s\x00%d" % (PROGRESS_PREFIX, source[0].encode(), source[1])


def _source_of(key: bytes) -> Source | None:
    topic, _, partition = key[len(PROGRESS_PREFIX):].rpartition(b"\x00")
    try:
        return topic.decode(), int(partition)
    except ValueError:  # UnicodeDecodeError is one
        return None


class AuditJoinProcessor:
    """One audit rule's join on one partition of its repartition topic (records keyed by join key).

    `process` first closes what waited on the observation's key past its window (by the partition's watermark,
    less the rule's grace), then pairs or keeps the observation; `punctuate` closes every window of the
    partition that ended by the watermark. Observations are timed by their event's time (`event_time`); the
    watermark is the least progress over the source partitions that feed the partition (`Watermark`: the
    runtime tells it the sources, `watermark.know`, and how far each was drained, `watermark.drained`), and it
    and each source's progress are kept in the table (`CLOCK_KEY`, `progress_key`: `resume` reads them back,
    `keep` writes them), so a restart neither rewinds them nor jumps them to the wall clock. Checks are timed by
    the wall clock (`now`).

    A repeat is skipped whenever it comes: an observation that says where it comes from (`origin`) at an offset
    at or below the last one joined from its side and source partition (kept in the table, `source_key`) was
    joined before. The forward stage sends a source partition's observations in offset order (one idempotent
    producer per process), so only a redelivery (at_least_once, after a crash) goes back. Without this, a
    repeat that came after its pair's window was forgotten would wait alone and be reported `missing`."""

    __slots__ = ("interval", "kept", "kept_progress", "rule", "tables", "watermark")

    def __init__(self, rule: AuditRule) -> None:
        self.rule = rule
        #: The time the partition has reached (`resume` reads the stored one).
        self.watermark = Watermark()
        #: The watermark the table holds (what `keep` last wrote or `resume` read).
        self.kept: float | None = None
        #: Each source's progress the table holds.
        self.kept_progress: dict[Source, float] = {}
        self.tables: tuple[str, ...] = (PENDING,)
        self.interval: float | None = rule.tick_interval

    def resume(self, state: State) -> None:
        """Read the partition's watermark and its sources' progress back from its table (when the partition is
        opened, and after an aborted batch; the sources known stay known). A table with progress but without a
        watermark had none yet (a source had not got anywhere): none, until every source has progress. A table
        of the release before (no progress) without a watermark gives the newest observation time it holds (none:
        no time yet), and holds it until every source has moved past it."""
        table = state[PENDING]
        stored = _time(table.get(CLOCK_KEY))
        progress: dict[Source, float] = {}
        for key, raw in table.items():
            if key.startswith(PROGRESS_PREFIX):
                source, at = _source_of(key), _time(raw)
                if source is not None and at is not None:
                    progress[source] = at
        if stored is None and not progress:  # the release before: its stream time was its newest observation's
            for key, raw in table.items():
                if key.startswith(SOURCE_PREFIX):
                    continue
                pending = self._read(key, raw, AuditOutput())
                for obs in (*pending.lefts, *pending.rights, *(o for pair in pending.pairs for o in pair)):
                    stored = obs.at if stored is None else max(stored, obs.at)
        old = self.watermark
        self.watermark = Watermark(stored, {*old.sources, *progress}, dict(progress), old.known)
        self.watermark.know(())
        self.kept = stored
        self.kept_progress = progress

    def keep(self, state: State, step: float = 0.0) -> None:
        """Write the watermark and each source's progress to the table where they moved (by more than `step`; a
        source's by more than PROGRESS_STEP too) since they were last written; once a batch, not a record. One not
        written is only a later close after a restart, never an early one."""
        table = state[PENDING]
        if _moved(self.watermark.time, self.kept, step):
            assert self.watermark.time is not None
            table.put(CLOCK_KEY, repr(self.watermark.time).encode())
            self.kept = self.watermark.time
        for source, at in self.watermark.progress.items():
            if _moved(at, self.kept_progress.get(source), max(step, PROGRESS_STEP)):
                table.put(progress_key(source), repr(at).encode())
                self.kept_progress[source] = at

    def process(self, record: Observation, state: State, now: float) -> AuditOutput:
        """Join one observation (its key is the join key) with what waits for it."""
        out = AuditOutput()
        rule, table, key = self.rule, state[PENDING], record.key.encode()
        source = source_key(record)
        if source is not None:
            assert record.origin is not None
            if record.origin[2] <= _offset(table.get(source)):
                out.repeated = True
                return out
            table.put(source, b"%d" % record.origin[2])
        mark = self.watermark
        mark.observe(None if record.origin is None else record.origin[:2], record.at)
        raw = table.get(key)
        pending = self._read(key, raw, out)
        if mark.time is not None:
            closed = expire(rule, pending, now=mark.time - rule.grace, detected_at=now)
            pending = closed.state
            out.checks.extend(closed.checks)
        step = observe(rule, pending, record, now=now)
        _write(table, key, step.state, raw)
        out.checks.extend(step.checks)
        return out

    def punctuate(self, state: State, now: float) -> AuditOutput:
        """Report and forget what waited in the partition past its window and the grace (by the watermark)."""
        out = AuditOutput()
        if self.watermark.time is None:
            return out  # no time yet
        rule, table = self.rule, state[PENDING]
        until = self.watermark.time - rule.grace
        due: list[tuple[bytes, bytes, JoinState]] = []
        for key, raw in list(table.items()):
            if key.startswith(SOURCE_PREFIX):
                continue
            pending = self._read(key, raw, out)
            ends = pending.due(rule.within)
            if ends is not None and ends < until:
                due.append((key, raw, pending))
        for key, raw, pending in due:
            step = expire(rule, pending, now=until, detected_at=now)
            _write(table, key, step.state, raw)
            out.checks.extend(step.checks)
        return out

    @staticmethod
    def _read(key: bytes, raw: bytes | None, out: AuditOutput) -> JoinState:
        try:
            return JoinState.from_bytes(raw)
        except ValueError as exc:
            # A state this version cannot read must not stop every audit: its pending observations are given up.
            out.unreadable.append((key, str(exc)))
            return JoinState()


def _time(raw: bytes | None) -> float | None:
    """A stored time (None: none, or unreadable)."""
    try:
        at = float(raw) if raw is not None else None
    except ValueError:
        return None
    return at if at is not None and math.isfinite(at) else None


def _moved(now: float | None, kept: float | None, step: float) -> bool:
    return now is not None and now != kept and (kept is None or now - kept > step)


def _offset(raw: bytes | None) -> int:
    """A stored source offset (-1: none, or unreadable)."""
    try:
        return int(raw) if raw is not None else -1
    except ValueError:
        return -1


def _write(table: TableState, key: bytes, pending: JoinState, before: bytes | None) -> None:
    if not pending.empty:
        table.put(key, pending.to_bytes())
    elif before is not None:
        table.delete(key)


def _conforming(verify: VerifyProcessor, audit: AuditJoinProcessor) -> tuple[
        Processor[RecordIn, Result], Processor[Observation, AuditOutput]]:
    """Never called: mypy checks here that both processors implement the Processor protocol."""
    return verify, audit
