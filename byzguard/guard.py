"""One record in, routing out: decode, read state, verify, and say what to send and what to write.

The same code serves the worker's agent, the contract checker and the benchmarks. State is anything with
`get(bytes) -> bytes | None` per table (a faust table, a dict, a snapshot); the writes come back as data,
so the caller applies them (to tables, in the agent's transaction).

Causal delivery (routes with `causal.buffer`): an event whose vector clock shows undelivered dependencies
is held in the entity's causal buffer; when the events it waits for are verified, it is released, verified
and routed in the same call, in causal order; past the route's deadline it is quarantined as causal.gap.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import orjson

from byzguard.causal import CausalBuffer, Deliverability, HeldEvent, classify, expire, offer, oldest_held_age
from byzguard.clocks import VectorClock
from byzguard.config import GuardConfig, Route, TypePolicy
from byzguard.engine import FORWARDED, RECORDED, Decision, Limits, decode_failure, verify_checked, verify_clean
from byzguard.envelope import Envelope, decode, decode_many
from byzguard.integrity import HMAC_SHA256, hmac_sha256
from byzguard.partitioner import misplaced
from byzguard.routing import Headers, quarantine_headers, verified_headers
from byzguard.state import EntityState, encode_lamport
from byzguard.verdict import Code, Outcome, Reason, Severity, quote

ENTITIES = "entities"
LAMPORTS = "lamports"
CAUSAL = "causal"
# The causal table's own bookkeeping: which entities of this partition hold events, and how many.
HELD_INDEX_KEY = b"\x00held-index"
_EMPTY_CLOCK = VectorClock()
_from_bytes: Final = EntityState.from_bytes


#: A record's independent work done ahead of its turn (`Guard.prepare`): what decode made of it (an envelope, or
#: its failure), and the HMAC-SHA256 of the bound form decode built, by the key the guard's keyring holds under the
#: checksum's key id (None when there is no such form, checksum or key). Guard.process decides the record with it
#: exactly as without it.
Prepared = tuple[Envelope | tuple[Code, str], str | None]


class StateReader(Protocol):
    """The read side of a state table."""

    def get(self, key: bytes) -> bytes | None: ...


# Not frozen (as Routed below): a frozen dataclass's __init__ sets each field through object.__setattr__, about
# three times the cost, once per input record. Treat it as immutable all the same.
@dataclass(slots=True)
class RecordIn:
    """A consumed record and its coordinates (where it was produced: quarantine names them).

    `partitions` is the partition count of the topic the guard read the record from, and `read_partition`
    the partition it was read from when that is not `partition` (a record re-partitioned by entity): with
    them the guard refuses a record that is not where its entity's state is (byzguard.partitioner).
    None: the record was not read from a partitioned topic (a sample, a file), so no placement is checked.
    """

    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    topic: str
    partition: int
    offset: int
    timestamp: float | None = None
    partitions: int | None = None
    read_partition: int | None = None

    @property
    def home(self) -> int:
        """The partition the record was read from: its state's, and its outputs' (co-partitioned)."""
        return self.partition if self.read_partition is None else self.read_partition

    def to_bytes(self) -> bytes:
        """Serialize a record to hold it in the causal buffer."""
        def b64(raw: bytes | None) -> str | None:
            return None if raw is None else base64.b64encode(raw).decode()
        return orjson.dumps([b64(self.key), b64(self.value), [[k, b64(v)] for k, v in self.headers],
                             self.topic, self.partition, self.offset, self.timestamp, self.read_partition])

    @classmethod
    def from_bytes(cls, raw: bytes) -> RecordIn:
        """Inverse of to_bytes."""
        key, value, headers, topic, partition, offset, timestamp, *rest = orjson.loads(raw)

        def unb64(text: str | None) -> bytes | None:
            return None if text is None else base64.b64decode(text)
        # No partition count: a released record was placed when it arrived. Its read partition (absent from
        # records held by earlier versions) is where its outputs go.
        return cls(unb64(key), unb64(value), [(k, unb64(v) or b"") for k, v in headers], topic, partition,
                   offset, timestamp, None, rest[0] if rest else None)


# Not frozen: a frozen dataclass's __init__ costs about 1 µs more, and one or two are built per event.
# Treat it as immutable all the same.
@dataclass(slots=True)
class Routed:
    """The fate of one record: its decision and the headers for each destination (None: not sent there)."""

    record: RecordIn
    decision: Decision
    envelope: Envelope | None
    verified_headers: Headers | None
    quarantine_headers: Headers | None


@dataclass(slots=True)
class Result:
    """Everything one input (a record or a deadline tick) caused: routed records in order, and state writes."""

    routed: list[Routed] = field(default_factory=list)
    writes: dict[tuple[str, bytes], bytes | None] = field(default_factory=dict)
    held_delta: int = 0
    #: After a deadline tick: seconds the longest-held record still held has waited (0.0 when none is).
    oldest_held_age: float | None = None

    @property
    def first(self) -> Routed:
        """The routing of the input record itself (released records follow it)."""
        return self.routed[0]


_new_result: Final = object.__new__
_VERIFIED: Final = Outcome.VERIFIED


class _Tx:
    """Reads through this call's own writes, so a released event sees the state its predecessor left."""

    __slots__ = ("result", "state")

    def __init__(self, state: Mapping[str, StateReader], result: Result) -> None:
        self.state = state
        self.result = result

    def get(self, table: str, key: bytes) -> bytes | None:
        writes = self.result.writes
        if writes and (table, key) in writes:  # empty until the first put: most reads skip the tuple
            return writes[(table, key)]
        return self.state[table].get(key)

    def put(self, table: str, key: bytes, value: bytes | None) -> None:
        self.result.writes[(table, key)] = value

    def buffer(self, subject: bytes) -> CausalBuffer:
        raw = self.get(CAUSAL, subject)
        return CausalBuffer.from_bytes(raw) if raw else CausalBuffer()

    def index(self) -> dict[str, int]:
        raw = self.get(CAUSAL, HELD_INDEX_KEY)
        return orjson.loads(raw) if raw else {}

    def set_buffer(self, subject: bytes, buf: CausalBuffer) -> None:
        index = self.index()
        before = index.get(subject.decode(), 0)
        after = len(buf.held)
        self.put(CAUSAL, subject, buf.to_bytes() if after else None)
        if after:
            index[subject.decode()] = after
        else:
            index.pop(subject.decode(), None)
        self.put(CAUSAL, HELD_INDEX_KEY, orjson.dumps(index))
        self.result.held_delta += after - before


class _OverlayTable:
    """One table as seen through a batch's writes so far (None: deleted), then the stored state."""

    __slots__ = ("stored", "written")

    def __init__(self, stored: StateReader) -> None:
        self.stored = stored
        self.written: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        written = self.written
        if written and key in written:
            return written[key]
        return self.stored.get(key)


class _Overlay(Mapping[str, StateReader]):
    """State tables seen through the writes of a batch's results so far (Guard.process_batch)."""

    __slots__ = ("tables",)

    def __init__(self, state: Mapping[str, StateReader]) -> None:
        self.tables = {name: _OverlayTable(table) for name, table in state.items()}

    def __getitem__(self, name: str) -> StateReader:
        return self.tables[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tables)

    def __len__(self) -> int:
        return len(self.tables)

    def absorb(self, result: Result) -> Result:
        """Let the records after read `result`'s writes."""
        tables = self.tables
        for (name, key), value in result.writes.items():
            tables[name].written[key] = value
        return result


def held_count(causal: StateReader) -> int:
    """Events held in one partition's causal buffer, read from its held index."""
    raw = causal.get(HELD_INDEX_KEY)
    return sum(orjson.loads(raw).values()) if raw else 0


def _refused_type(policy: TypePolicy) -> bool:
    """True when the policy is a route's fallback for unlisted types and the route refuses them."""
    return not policy.listed and policy.level(Code.TYPE_UNLISTED) is Severity.REJECT


class Guard:
    """Verifies records of every route of a configuration."""

    __slots__ = ("config", "limits")

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.limits = Limits(config.ids_per_entity, config.id_window, config.last_good_max_bytes)

    def prepare(self, records: Sequence[RecordIn], route: Route) -> list[Prepared]:
        """The work of a batch that does not depend on the state or on the records before: the records decoded
        (envelope.decode_many, itself in passes), then each bound form's HMAC, one step over all the records at a
        time (a pass runs one small piece of code over and over, which the CPU runs about twice as fast as the
        whole per-event path: bench/results/core-*/NOTE.md of issue 21). Hand each one to `process` (prepared=),
        in record order, or all of them to `process_batch`."""
        writers = route.input_sources
        default_type = route.default_type
        decoded = decode_many([(r.key, r.value, r.headers, writers.get(r.topic) if writers else None)
                               for r in records], default_type)
        keyring = self.config.keyring
        prepared: list[Prepared] = []
        for env in decoded:
            digest = None
            if isinstance(env, Envelope):  # exact type: no __class__ lookup (isinstance(env, tuple) has one)
                bound, checksum = env.bound, env.checksum
                if bound is not None and checksum is not None and checksum.algorithm == HMAC_SHA256 \
                        and checksum.key_id:
                    key = keyring.get(checksum.key_id)
                    if key is not None:
                        digest = hmac_sha256(key.secret, bound)
            prepared.append((env, digest))
        return prepared

    def process(self, record: RecordIn, route: Route, state: Mapping[str, StateReader], *, now: float,
                prepared: Prepared | None = None) -> Result:
        """Decide one record's fate (and that of held records it releases); never raises for a bad record.

        `prepared`: what `prepare` made of this very record (with this route), if it ran; the decision is the same."""
        # Result() field by field: the dataclass __init__ with two default factories costs three times more.
        result = _new_result(Result)
        result.routed = []
        result.writes = {}
        result.held_delta = 0
        result.oldest_held_age = None
        tx = _new_result(_Tx)  # _Tx(state, result), without its __init__ call
        tx.state = state
        tx.result = result
        self._one(record, route, tx, now, route.holds, False, prepared)  # route.causal.buffer
        return result

    def process_batch(self, records: Sequence[RecordIn], route: Route, state: Mapping[str, StateReader],
                      now: float, prepared: Sequence[Prepared] | None = None) -> list[Result]:
        """`process` of each record in order, each reading the writes of those before it in the batch (as if each
        result's writes were applied to `state` before the next record; `state` itself is only read: the caller
        applies the results' writes, in order). The same results, in less time per record: the work runs in
        passes over the batch (reads, state decoding, decisions, the writes' bytes, the headers), and a record whose
        entity or writer an earlier record of the batch wrote reads those writes' bytes (an overlay).

        `prepared`: `prepare(records, route)`, if it ran. A route with a causal buffer takes `process` record by
        record (through the overlay)."""
        if prepared is None:
            prepared = self.prepare(records, route)
        if route.holds:
            overlay = _Overlay(state)
            return [overlay.absorb(self.process(record, route, overlay, now=now, prepared=p))
                    for record, p in zip(records, prepared, strict=True)]
        writers = route.input_sources
        types, fallback = route.types, route.fallback
        entities, lamports = state[ENTITIES], state[LAMPORTS]
        # Pass 1: each placed envelope's keys and policy, and each key's stored value, read once per batch.
        # entity_view / mark_view: a key's value as the next record to read it must see it (the stored one, then
        # what the batch wrote); readers: how many records of the batch read each entity key.
        entity_view: dict[bytes, bytes | None] = {}
        mark_view: dict[bytes, bytes | None] = {}
        readers: dict[bytes, int] = {}
        plan: list[tuple[Envelope, bytes, bytes, TypePolicy] | None] = []
        firsts: list[bytes | None] = []  # the stored value of each record that reads its entity key first
        for record, (decoded, _) in zip(records, prepared, strict=True):
            env = _placed(record, decoded)
            if env is None:
                plan.append(None)
                firsts.append(None)
                continue
            entity_key = env.subject.encode()
            lamport_key = _lamport_key(record, env)
            if entity_key in readers:
                readers[entity_key] += 1
                firsts.append(None)
            else:
                readers[entity_key] = 1
                entity_view[entity_key] = raw = entities.get(entity_key)
                firsts.append(raw)
            if env.lamport is not None and lamport_key not in mark_view:
                mark_view[lamport_key] = lamports.get(lamport_key)
            plan.append((env, entity_key, lamport_key, types.get(env.type, fallback)))  # route.policy_for
        # Pass 2: the stored state of each entity key's first reader decoded (no record before it wrote the key).
        states = [_from_bytes(raw) if raw else None for raw in firsts]
        # Pass 3: the decisions, in order. A later reader of a key an earlier record wrote decodes the bytes written
        # (as it would read them from the table): a state another record of the batch reads next is encoded at once,
        # the others in pass 4.
        decisions: list[Decision | None] = []
        encoded: list[bytes | None] = []
        for record, (_, digest), step, first in zip(records, prepared, plan, states, strict=True):
            if step is None:
                decisions.append(None)
                encoded.append(None)
                continue
            env, entity_key, lamport_key, policy = step
            entity: EntityState | None = first
            if first is None:
                raw = entity_view[entity_key]
                entity = _from_bytes(raw) if raw else None
            mark = None
            if env.lamport is not None:
                raw = mark_view[lamport_key]
                mark = int(raw) if raw else None  # decode_lamport
            decision = self._decide(record, env, policy, entity, mark, writers.get(record.topic) if writers else None,
                                    digest, now)
            decisions.append(decision)
            count = readers[entity_key] - 1
            readers[entity_key] = count
            if decision.entity is not None and count:
                encoded.append(decision.entity.to_bytes())
                entity_view[entity_key] = encoded[-1]
            else:
                encoded.append(None)
            if decision.lamport is not None:
                mark_view[lamport_key] = str(decision.lamport).encode()  # encode_lamport
        # Pass 4: each record's result and writes (entity, then Lamport mark, as _one writes them); a record that
        # did not decode or is misplaced is routed here, as _one routes it.
        results: list[Result] = []
        for record, decided, step, entity_bytes, (decoded, _) in zip(records, decisions, plan, encoded, prepared,
                                                                   strict=True):
            result = _new_result(Result)
            result.routed = []
            result.writes = {}
            result.held_delta = 0
            result.oldest_held_age = None
            results.append(result)
            if step is None or decided is None:
                self._refuse(result, record, route, decoded, now)
                continue
            _, entity_key, lamport_key, _ = step
            writes = result.writes
            if decided.entity is not None:
                writes[(ENTITIES, entity_key)] = decided.entity.to_bytes() if entity_bytes is None else entity_bytes
            if decided.lamport is not None:
                writes[(LAMPORTS, lamport_key)] = str(decided.lamport).encode()  # encode_lamport
        # Pass 5: the routing (headers) of each decided record.
        for record, decided, step, result in zip(records, decisions, plan, results, strict=True):
            if step is not None and decided is not None:
                result.routed.append(_routed(record, route, decided, step[0], now))
        return results

    def expire_held(self, route: Route, state: Mapping[str, StateReader], *, now: float) -> Result:
        """Quarantine held records past the route's deadline (causal.gap, with what they still miss)."""
        result = Result()
        tx = _Tx(state, result)
        oldest = 0.0
        for subject in list(tx.index()):
            key = subject.encode()
            buf = tx.buffer(key)
            entity = self._entity(tx, key)
            delivered = entity.vclock if entity is not None and entity.vclock is not None else _EMPTY_CLOCK
            kept, expired = expire(CausalBuffer(delivered, buf.held), now=now, deadline_s=route.causal.deadline)
            oldest = max(oldest, oldest_held_age(kept, now=now))
            if not expired:
                continue
            tx.set_buffer(key, kept)
            for held, gaps in expired:
                record = RecordIn.from_bytes(held.payload)
                wanted = ", ".join(f"{node} {first}..{last}" if first != last else f"{node} {first}"
                                   for node, first, last in gaps)
                reason = Reason(Code.CAUSAL_GAP, f"held {now - held.held_at:.1f}s for missing dependencies: {wanted}")
                # Decoded again (it was when held): its envelope gives the final receipt and the metric labels.
                decoded = decode(record.key, record.value, record.headers, default_type=route.default_type)
                env = decoded if isinstance(decoded, Envelope) else None
                self._emit(tx, record, route, Decision(Outcome.QUARANTINED, (reason,)), env, now)
        result.oldest_held_age = oldest
        return result

    # -- one record ---------------------------------------------------------------------------------------

    def _entity(self, tx: _Tx, key: bytes) -> EntityState | None:
        raw = tx.get(ENTITIES, key)
        return EntityState.from_bytes(raw) if raw else None

    def _one(self, record: RecordIn, route: Route, tx: _Tx, now: float, hold: bool,
             released: bool = False, prepared: Prepared | None = None) -> None:
        writers = route.input_sources
        writer = writers.get(record.topic) if writers else None
        if prepared is None:
            decoded = decode(record.key, record.value, record.headers, route.default_type, writer)  # positionally
            digest = None
        else:
            decoded, digest = prepared
        env = _placed(record, decoded)
        if env is None:
            self._refuse(tx.result, record, route, decoded, now)
            return
        entity_key = env.subject.encode()
        # tx.get inline, and _entity: the reads of every event.
        writes = tx.result.writes
        tables = tx.state
        raw = writes[(ENTITIES, entity_key)] if writes and (ENTITIES, entity_key) in writes \
            else tables[ENTITIES].get(entity_key)
        entity = _from_bytes(raw) if raw else None
        policy = route.types.get(env.type, route.fallback)  # route.policy_for
        lamport_key = _lamport_key(record, env)
        # A released event's Lamport time was judged when it arrived; later events of its source may have
        # advanced the mark since, which says nothing about this one.
        mark = None
        if env.lamport is not None and not released:
            raw = writes[(LAMPORTS, lamport_key)] if writes and (LAMPORTS, lamport_key) in writes \
                else tables[LAMPORTS].get(lamport_key)
            mark = int(raw) if raw else None  # decode_lamport
        # A type the route refuses is judged at once: it must neither wait in the buffer nor fill it.
        if hold and env.vclock is not None and not _refused_type(policy) \
                and self._held(tx, record, route, env, entity, entity_key, lamport_key, mark, now):
            return
        decision = self._decide(record, env, policy, entity, mark, writer, digest, now)
        if decision.entity is not None:
            writes[(ENTITIES, entity_key)] = decision.entity.to_bytes()  # tx.put
        if decision.lamport is not None and not released:
            writes[(LAMPORTS, lamport_key)] = str(decision.lamport).encode()  # encode_lamport
        tx.result.routed.append(_routed(record, route, decision, env, now))
        if hold and decision.entity is not None:
            self._release(tx, route, entity_key, now)

    def _decide(self, record: RecordIn, env: Envelope, policy: TypePolicy, entity: EntityState | None,
                mark: int | None, writer: str | None, digest: str | None, now: float) -> Decision:
        """The decision on a placed envelope, given its entity's state and its writer's Lamport mark: the clean
        path, else every check (positionally)."""
        keyring, limits, received = self.config.keyring, self.limits, record.timestamp
        return verify_clean(env, policy, entity, mark, keyring, now, limits, received, writer, digest) \
            or verify_checked(env, policy, entity, mark, keyring, now, limits, received, writer)

    @staticmethod
    def _refuse(result: Result, record: RecordIn, route: Route, decoded: Envelope | tuple[Code, str],
                now: float) -> None:
        """Route a record that failed to decode, or that is not where its entity's state is (quarantined)."""
        if isinstance(decoded, Envelope):
            wrong = misplaced(record.key, decoded.subject, record.home, record.partitions or 0)
            assert wrong is not None
            result.routed.append(_routed(record, route, decode_failure(*wrong), decoded, now))
        else:
            result.routed.append(_routed(record, route, decode_failure(*decoded), None, now))

    def _held(self, tx: _Tx, record: RecordIn, route: Route, env: Envelope, entity: EntityState | None,
              entity_key: bytes, lamport_key: bytes, mark: int | None, now: float) -> bool:
        """Hold `env` if its dependencies are missing; True when it was held (or refused for overflow)."""
        assert env.vclock is not None
        delivered = entity.vclock if entity is not None and entity.vclock is not None else _EMPTY_CLOCK
        if classify(delivered, env.source, env.vclock) is not Deliverability.EARLY:
            return False
        if env.lamport is not None and mark is not None and env.lamport <= mark:
            return False  # judged now: the normal checks quarantine it as lamport.regression
        buf = tx.buffer(entity_key)
        causal = route.causal
        total = sum(tx.index().values())
        payload = record.to_bytes()
        # A buffer is kept in its entity's state record, which must fit its changelog: bounded in bytes too.
        too_many_bytes = sum(len(h.payload) for h in buf.held) + len(payload) > causal.max_held_bytes
        room = 0 if too_many_bytes or total >= causal.max_held_total else causal.max_held_per_scope
        offered = offer(CausalBuffer(delivered, buf.held), HeldEvent(env.id, env.source, env.vclock, now, payload),
                        now=now, max_held=room)
        if offered.status is Deliverability.STALE:
            dup = Reason(Code.ID_DUPLICATE, f"event {quote(env.id)} is already held for its dependencies",
                         Severity.WARN)
            self._emit(tx, record, route, Decision(Outcome.DUPLICATE, (dup,)), env, now)
            return True
        if offered.status is Deliverability.INVALID:
            return False  # equivocation: the normal clock checks judge it
        if offered.overflow is not None:
            level = route.policy_for(env.type).level(Code.CAUSAL_OVERFLOW)
            if level is Severity.OFF:
                return False
            if too_many_bytes:
                where = f"entity ({causal.max_held_bytes} bytes of held records at most)"
            elif len(buf.held) >= causal.max_held_per_scope:
                where = f"entity ({causal.max_held_per_scope} held)"
            else:
                where = f"partition ({causal.max_held_total} held in partition {record.partition})"
            reason = Reason(Code.CAUSAL_OVERFLOW, f"causal buffer full for this {where}; event depends on "
                            f"undelivered events", level)
            outcome = Outcome.QUARANTINED if level is Severity.REJECT else Outcome.WARNED
            if outcome is Outcome.WARNED:
                return False
            self._emit(tx, record, route, Decision(outcome, (reason,)), env, now)
            return True
        tx.set_buffer(entity_key, offered.buffer)
        if env.lamport is not None:
            # Arrival order is what the Lamport check judges, so the mark moves now, not on release.
            tx.put(LAMPORTS, lamport_key, encode_lamport(env.lamport))
        self._emit(tx, record, route, Decision(Outcome.HELD), env, now)
        return True

    def _release(self, tx: _Tx, route: Route, entity_key: bytes, now: float) -> None:
        """Verify and route every held event of the entity that has become deliverable, in causal order."""
        while True:
            buf = tx.buffer(entity_key)
            if not buf.held:
                return
            entity = self._entity(tx, entity_key)
            delivered = entity.vclock if entity is not None and entity.vclock is not None else _EMPTY_CLOCK
            ready = next((h for h in buf.held
                          if classify(delivered, h.source, h.clock) is not Deliverability.EARLY), None)
            if ready is None:
                return
            tx.set_buffer(entity_key, CausalBuffer(buf.delivered, tuple(h for h in buf.held if h is not ready)))
            self._one(RecordIn.from_bytes(ready.payload), route, tx, now, hold=False, released=True)

    def _emit(self, tx: _Tx, record: RecordIn, route: Route, decision: Decision, env: Envelope | None,
              now: float) -> None:
        tx.result.routed.append(_routed(record, route, decision, env, now))


def _placed(record: RecordIn, decoded: Envelope | tuple[Code, str]) -> Envelope | None:
    """The envelope of a record that decoded and is where its entity's state is; None otherwise (Guard._refuse)."""
    if not isinstance(decoded, Envelope):  # not isinstance(decoded, tuple): that looks up an Envelope's __class__
        return None
    partitions = record.partitions
    # None also for a record released from the causal buffer: checked on arrival.
    if partitions is not None and misplaced(record.key, decoded.subject, record.home, partitions) is not None:
        return None
    return decoded


def _lamport_key(record: RecordIn, env: Envelope) -> bytes:
    """The key of the writer's Lamport mark. One mark per writer (source, or source and producer instance:
    byzguard.clocks.lamport_mark_key). Kafka keeps a writer's send order within one partition only, and a
    repartition topic merges several: there, a writer's Lamport mark is kept per input partition the record came
    from."""
    instance = env.instance
    # lamport_mark_key(env.source, instance), inline (tests/unit/test_clean_path.py holds them equal)
    key = env.source.encode() if instance is None else f"{env.source}\x00{instance}".encode()
    if record.read_partition is not None:
        key += f"\x00{record.topic}\x00{record.partition}".encode()
    return key


def _routed(record: RecordIn, route: Route, decision: Decision, env: Envelope | None, now: float) -> Routed:
    """The routing of a decided record: its decision and the headers for each destination."""
    outcome = decision.outcome
    # Routed(...) field by field: a third of the dataclass __init__'s cost.
    routed = _new_result(Routed)
    routed.record = record
    routed.decision = decision
    routed.envelope = env
    if outcome is _VERIFIED and not decision.reasons:  # the common case: verified, no reason, not recorded
        routed.verified_headers = verified_headers(record.headers, _VERIFIED, (), route.name, now)
        routed.quarantine_headers = None
        return routed
    routed.verified_headers = verified_headers(record.headers, outcome, decision.reasons, route.name, now) \
        if outcome in FORWARDED else None  # decision.forward, without the property's call
    routed.quarantine_headers = quarantine_headers(
        record.headers, outcome, decision.reasons, route.name, topic=record.topic,
        partition=record.partition, offset=record.offset, timestamp=record.timestamp, now=now,
    ) if outcome in RECORDED else None  # decision.quarantine
    return routed
