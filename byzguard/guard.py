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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import orjson

from byzguard.causal import CausalBuffer, Deliverability, HeldEvent, classify, expire, offer, oldest_held_age
from byzguard.clocks import VectorClock
from byzguard.config import GuardConfig, Route, TypePolicy
from byzguard.engine import FORWARDED, RECORDED, Decision, Limits, decode_failure, verify_checked, verify_clean
from byzguard.envelope import Envelope, decode
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
        """The work of a batch that does not depend on the state or on the records before: each record decoded, then
        each bound form's HMAC, one step over all the records at a time (a pass runs one small piece of code over
        and over, which the CPU runs about twice as fast as the whole per-event path: bench/results/core-*/NOTE.md
        of issue 21). Hand each one to `process` (prepared=), in record order."""
        writers = route.input_sources
        default_type = route.default_type
        decoded = [decode(r.key, r.value, r.headers, default_type, writers.get(r.topic) if writers else None)
                   for r in records]
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
        if not isinstance(decoded, Envelope):  # not isinstance(decoded, tuple): that looks up an Envelope's __class__
            self._emit(tx, record, route, decode_failure(*decoded), None, now)
            return
        env = decoded
        partitions = record.partitions
        if partitions is not None:  # None also for a record released from the causal buffer: checked on arrival
            wrong = misplaced(record.key, env.subject, record.home, partitions)
            if wrong is not None:
                self._emit(tx, record, route, decode_failure(*wrong), env, now)
                return
        entity_key = env.subject.encode()
        # tx.get and decode_lamport inline, and _entity: the reads of every event.
        writes = tx.result.writes
        tables = tx.state
        raw = writes[(ENTITIES, entity_key)] if writes and (ENTITIES, entity_key) in writes \
            else tables[ENTITIES].get(entity_key)
        entity = _from_bytes(raw) if raw else None
        policy = route.types.get(env.type, route.fallback)  # route.policy_for
        # One mark per writer (source, or source and producer instance: byzguard.clocks.lamport_mark_key). Kafka
        # keeps a writer's send order within one partition only, and a repartition topic merges several: there,
        # a writer's Lamport mark is kept per input partition the record came from.
        instance = env.instance
        # lamport_mark_key(env.source, instance), inline (tests/unit/test_clean_path.py holds them equal)
        lamport_key = env.source.encode() if instance is None else f"{env.source}\x00{instance}".encode()
        if record.read_partition is not None:
            lamport_key += f"\x00{record.topic}\x00{record.partition}".encode()
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
        # verify, positionally: the clean path, else every check.
        keyring, limits, received = self.config.keyring, self.limits, record.timestamp
        decision = verify_clean(env, policy, entity, mark, keyring, now, limits, received, writer, digest) \
            or verify_checked(env, policy, entity, mark, keyring, now, limits, received, writer)
        if decision.entity is not None:
            writes[(ENTITIES, entity_key)] = decision.entity.to_bytes()  # tx.put
        if decision.lamport is not None and not released:
            writes[(LAMPORTS, lamport_key)] = str(decision.lamport).encode()  # encode_lamport
        if decision.outcome is _VERIFIED and not decision.reasons:
            # _emit's common case inline: verified, no reason, so no quarantine headers.
            routed = _new_result(Routed)
            routed.record = record
            routed.decision = decision
            routed.envelope = env
            routed.verified_headers = verified_headers(record.headers, _VERIFIED, (), route.name, now)
            routed.quarantine_headers = None
            tx.result.routed.append(routed)
        else:
            self._emit(tx, record, route, decision, env, now)
        if hold and decision.entity is not None:
            self._release(tx, route, entity_key, now)

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
        outcome = decision.outcome
        forward = verified_headers(record.headers, outcome, decision.reasons, route.name, now) \
            if outcome in FORWARDED else None  # decision.forward, without the property's call
        quarantine = quarantine_headers(
            record.headers, outcome, decision.reasons, route.name, topic=record.topic,
            partition=record.partition, offset=record.offset, timestamp=record.timestamp, now=now,
        ) if outcome in RECORDED else None  # decision.quarantine
        # Routed(...) field by field: a third of the dataclass __init__'s cost.
        routed = _new_result(Routed)
        routed.record = record
        routed.decision = decision
        routed.envelope = env
        routed.verified_headers = forward
        routed.quarantine_headers = quarantine
        tx.result.routed.append(routed)
