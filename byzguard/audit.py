"""Cross-stream consistency audits: a windowed join of two verified streams by a key, as pure functions.

An audit rule says "every `left` record has a `right` record with the same join key within `within`
seconds, and their values agree" (orders vs payments: every order.confirmed has a payment.captured with
the same data.paymentId and data.amount == data.total within 10 minutes). This is the seed's Strategy 4
(cross-service consistency checks) run over the event streams instead of by polling services; it catches
the partial write no single service can see.

Each record of either side becomes an `Observation`. The pending observations of one join key form a
`JoinState` (a table value in the worker, co-partitioned by the join key). `observe` pairs a new
observation with a pending counterpart inside the window, so that pair is one check: it passes, or it is a
`mismatch`. `expire` ends the wait for observations whose window has closed: an unpaired left is a
`missing` discrepancy (an unpaired right too when the rule requires both directions). Agreement rate =
checks passed / checks made. The worker's agents and the on-demand CLI (`audit_batch`) share this code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import orjson

from byzguard.routing import bounded_id
from byzguard.verdict import quote

_STATE_FORMAT = 1

#: Pending observations kept per join key and side; beyond it the oldest is given up (reported missing).
MAX_PENDING_PER_KEY = 64

_PATH = re.compile(r"^(subject|data(\.[A-Za-z0-9_$@-]+)*)$")
_NUMBER = re.compile(r"^\s*-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")


class Side(StrEnum):
    """Which stream of a rule an observation comes from."""

    LEFT = "left"
    RIGHT = "right"

    @property
    def other(self) -> Side:
        """The opposite side."""
        return Side.RIGHT if self is Side.LEFT else Side.LEFT


class Kind(StrEnum):
    """What is wrong: the counterpart never came within the window, or it came and disagrees."""

    MISSING = "missing"
    MISMATCH = "mismatch"


class Require(StrEnum):
    """Which side must find its counterpart: every left record (default), or every record of both."""

    LEFT = "left"
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class FieldPath:
    """A path into an event: `subject` (the entity id) or `data.a.b` (a field of the data; digits index lists)."""

    text: str
    parts: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> FieldPath:
        """Parse `subject` or `data.<field>[.<field>...]`; ValueError otherwise."""
        if not isinstance(text, str) or not _PATH.match(text):
            raise ValueError(f"{text!r} is not a field path: use subject or data.<field>[.<field>...]")
        return cls(text, tuple(text.split(".")))

    def extract(self, data: Any, subject: str) -> tuple[bool, Any]:
        """(found, value) of this path in an event's data and subject."""
        if self.parts[0] == "subject":
            return True, subject
        node = data
        for part in self.parts[1:]:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return False, None
        return True, node


@dataclass(frozen=True, slots=True)
class AuditSide:
    """One stream of a rule: records of `type` on verified topic `topic`, joined on `key`, compared on `value`."""

    name: str
    topic: str
    type: str
    key: FieldPath
    value: FieldPath | None = None


@dataclass(frozen=True, slots=True)
class AuditRule:
    """A compiled audit rule (see byzguard.config for the file shape)."""

    name: str
    left: AuditSide
    right: AuditSide
    within: float
    grace: float = 5.0
    tolerance: float = 0.0
    require: Require = Require.LEFT
    discrepancies_topic: str = "audit.discrepancies"
    partitions: int = 4
    description: str = ""

    def side(self, which: Side) -> AuditSide:
        """The left or right side."""
        return self.left if which is Side.LEFT else self.right

    def sides_of(self, topic: str, event_type: str) -> tuple[Side, ...]:
        """The sides a record of `event_type` on `topic` belongs to (none, usually)."""
        return tuple(s for s in Side if self.side(s).topic == topic and self.side(s).type == event_type)

    @property
    def topics(self) -> tuple[str, ...]:
        """The verified topics the rule reads, without repeats."""
        return tuple(dict.fromkeys((self.left.topic, self.right.topic)))

    def is_subject(self, which: Side) -> bool:
        """Whether a record of this side must find its counterpart (else it only serves as one)."""
        return which is Side.LEFT or self.require is Require.BOTH

    @property
    def tick_interval(self) -> float:
        """How often window expiry runs: a quarter of the window, between 0.5 s and 30 s."""
        return min(30.0, max(0.5, self.within / 4))


@dataclass(frozen=True, slots=True)
class Observation:
    """One record of one side as the join sees it."""

    side: Side
    key: str
    entity: str
    event_id: str
    at: float
    value: Any = None
    has_value: bool = False
    #: Where the record it was made of is: (verified topic, partition, offset); not part of its serialized form
    #: (the repartition record carries it in a header). The join skips an observation it already joined.
    origin: tuple[str, int, int] | None = field(default=None, compare=False)

    def to_json(self) -> list[Any]:
        """Compact JSON form (repartition records and join state)."""
        return [self.side.value, self.key, self.entity, self.event_id, self.at, self.value, self.has_value]

    @classmethod
    def from_json(cls, raw: Sequence[Any]) -> Observation:
        """Inverse of to_json."""
        side, key, entity, event_id, at, value, has_value = raw
        return cls(Side(side), key, entity, event_id, float(at), value, bool(has_value))

    def to_bytes(self) -> bytes:
        """Serialize for the repartition topic."""
        return orjson.dumps(self.to_json())

    @classmethod
    def from_bytes(cls, raw: bytes) -> Observation:
        """Inverse of to_bytes."""
        return cls.from_json(orjson.loads(raw))


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """A consistency failure, in the seed's ConsistencyResult shape plus the rule, the kind and the key."""

    rule: str
    kind: Kind
    key: str
    entity: str
    service_a: dict[str, Any]
    service_b: dict[str, Any]
    window: float
    detected_at: float
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to the audit topic and printed by the CLI."""
        return {"rule": self.rule, "kind": self.kind.value, "key": self.key, "entity": self.entity,
                "serviceA": self.service_a, "serviceB": self.service_b, "windowSeconds": self.window,
                "detectedAt": self.detected_at, "detail": self.detail}

    def to_bytes(self) -> bytes:
        """The audit topic record value."""
        return orjson.dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class Check:
    """One check made: a subject record and its counterpart (None: missing); a discrepancy unless it passed."""

    rule: str
    key: str
    subject: Observation
    counterpart: Observation | None
    discrepancy: Discrepancy | None

    @property
    def passed(self) -> bool:
        """True when the services agree."""
        return self.discrepancy is None


@dataclass(frozen=True, slots=True)
class JoinState:
    """What one join key is waiting for: pending observations of each side, and the pairs already checked
    (kept for a window, so a redelivered event is not checked twice and a restated one is checked again)."""

    lefts: tuple[Observation, ...] = ()
    rights: tuple[Observation, ...] = ()
    pairs: tuple[tuple[Observation, Observation], ...] = ()  # (left, right)

    @property
    def empty(self) -> bool:
        """Nothing pending and nothing remembered: the table entry can go."""
        return not (self.lefts or self.rights or self.pairs)

    def pending(self, which: Side) -> tuple[Observation, ...]:
        """Pending observations of one side."""
        return self.lefts if which is Side.LEFT else self.rights

    def with_pending(self, which: Side, obs: tuple[Observation, ...]) -> JoinState:
        """A copy with one side's pending observations replaced."""
        return replace(self, lefts=obs) if which is Side.LEFT else replace(self, rights=obs)

    def due(self, within: float) -> float | None:
        """When the earliest entry's window closes (None when nothing is kept)."""
        times = [o.at for o in (*self.lefts, *self.rights)] + [max(lt.at, rt.at) for lt, rt in self.pairs]
        return min(times) + within if times else None

    def to_bytes(self) -> bytes:
        """Serialize for the join table."""
        return orjson.dumps([_STATE_FORMAT, [o.to_json() for o in self.lefts], [o.to_json() for o in self.rights],
                             [[lt.to_json(), rt.to_json()] for lt, rt in self.pairs]])

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> JoinState:
        """Inverse of to_bytes; an empty state for None; ValueError for bytes it cannot read."""
        if not raw:
            return cls()
        try:
            version, lefts, rights, pairs = orjson.loads(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            raise ValueError(f"not a join state: {exc}") from None
        if version != _STATE_FORMAT:
            raise ValueError(f"join state format {version!r} is not {_STATE_FORMAT}")
        return cls(tuple(Observation.from_json(o) for o in lefts), tuple(Observation.from_json(o) for o in rights),
                   tuple((Observation.from_json(lt), Observation.from_json(rt)) for lt, rt in pairs))


@dataclass(slots=True)
class JoinStep:
    """The state after one observation or expiry, and the checks it completed."""

    state: JoinState
    checks: list[Check] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- values


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.match(value):
        return float(value)
    return None


def values_agree(a: Any, b: Any, tolerance: float = 0.0) -> bool:
    """Numbers (or numeric strings: "100.00" agrees with 100) within `tolerance`; anything else by equality."""
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        if not (math.isfinite(na) and math.isfinite(nb)):
            return na == nb
        # A relative epsilon absorbs binary float noise (0.1 + 0.2), never a cent on any real amount.
        return abs(na - nb) <= tolerance + 1e-9 * max(1.0, abs(na), abs(nb))
    if isinstance(a, bool) or isinstance(b, bool):  # JSON true is not 1
        return a is b
    return bool(a == b)


#: The longest join key an audit joins on: a longer one is unusable (a subject record is then `missing`).
MAX_JOIN_KEY_CHARS = 1024


def _json_key(value: Any) -> str | None:
    """A join key as text: strings as they are, integers in decimal; anything else cannot join."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


# --------------------------------------------------------------------------------------------- records


def observation_of(rule: AuditRule, which: Side, data: Any, *, subject: str, event_id: str,
                   at: float) -> Observation | Check | None:
    """Turn a record of one side into an Observation; a record without a usable join key cannot be joined:
    a subject record is then a `missing` check at once, a counterpart record is ignored (None)."""
    side = rule.side(which)
    found, raw_key = side.key.extract(data, subject)
    has_value, value = side.value.extract(data, subject) if side.value is not None else (False, None)
    key = _json_key(raw_key) if found else None
    if key is not None and len(key) > MAX_JOIN_KEY_CHARS:
        key = None  # no real join key is this long; as a record key it could not even be sent on
    # Ids and entities are kept for matching and reports; a long one is kept as its hash (the receipts' rule).
    obs = Observation(which, key or "", bounded_id(subject), bounded_id(event_id), at, value, has_value)
    if key is not None:
        return obs
    if not rule.is_subject(which):
        return None
    why = "has no" if not found else "has an unusable"
    return _missing(rule, obs, at, f"{side.type} {quote(subject)} {why} {side.key.text}, so no "
                                    f"{rule.side(which.other).type} can be matched to it")


def _service(side: AuditSide, obs: Observation | None) -> dict[str, Any]:
    if obs is None:
        return {"name": side.name, "type": side.type, "value": None}
    out: dict[str, Any] = {"name": side.name, "type": side.type, "entity": obs.entity, "eventId": obs.event_id,
                           "at": obs.at}
    out["value"] = obs.value if side.value is not None else side.type
    return out


def _pair(subject: Observation) -> tuple[Observation | None, Observation | None]:
    return (subject, None) if subject.side is Side.LEFT else (None, subject)


def _missing(rule: AuditRule, subject: Observation, now: float, detail: str | None = None) -> Check:
    left, right = _pair(subject)
    mine, theirs = rule.side(subject.side), rule.side(subject.side.other)
    detail = detail or (f"no {theirs.type} with {theirs.key.text} = {quote(subject.key)} within {rule.within:g}s "
                        f"of {mine.type} {quote(subject.entity)}")
    disc = Discrepancy(rule.name, Kind.MISSING, subject.key, subject.entity, _service(rule.left, left),
                       _service(rule.right, right), rule.within, now, detail)
    return Check(rule.name, subject.key, subject, None, disc)


def _compare(rule: AuditRule, left: Observation, right: Observation, now: float) -> Check:
    if _agree(rule, left, right):
        return Check(rule.name, left.key, left, right, None)
    lpath = rule.left.value.text if rule.left.value else "value"
    rpath = rule.right.value.text if rule.right.value else "value"
    detail = (f"{rule.left.type} {quote(left.entity)} {lpath} = {_shown(left)} but {rule.right.type} "
              f"{quote(right.entity)} {rpath} = {_shown(right)}")
    disc = Discrepancy(rule.name, Kind.MISMATCH, left.key, left.entity, _service(rule.left, left),
                       _service(rule.right, right), rule.within, now, detail)
    return Check(rule.name, left.key, left, right, disc)


def _shown(obs: Observation) -> str:
    return quote(obs.value) if obs.has_value else "(absent)"


def _agree(rule: AuditRule, left: Observation, right: Observation) -> bool:
    if rule.left.value is None or rule.right.value is None:
        return True  # presence-only rule
    if not (left.has_value and right.has_value):
        return False
    return values_agree(left.value, right.value, rule.tolerance)


# --------------------------------------------------------------------------------------------- the join


def _mine(pair: tuple[Observation, Observation], which: Side) -> Observation:
    return pair[0] if which is Side.LEFT else pair[1]


def observe(rule: AuditRule, state: JoinState, obs: Observation, *, now: float) -> JoinStep:
    """Add one observation of an entity.

    - A redelivered event (an id already seen) changes nothing.
    - A restatement (a new event of an entity already waiting or paired on this key): a waiting one takes
      the new value and keeps its window; a paired one with a changed value is checked again against its
      counterpart.
    - Otherwise it is paired with a waiting counterpart within the window (one that agrees first, else the
      earliest) and the pair is checked; with none, it waits.
    """
    mine = state.pending(obs.side)
    if any(o.event_id == obs.event_id for o in mine) or any(
            _mine(p, obs.side).event_id == obs.event_id for p in state.pairs):
        return JoinStep(state)
    same = next((o for o in mine if o.entity == obs.entity), None)
    if same is not None:
        restated = replace(obs, at=same.at)
        return JoinStep(state.with_pending(obs.side, tuple(restated if o is same else o for o in mine)))
    pair = next((p for p in state.pairs if _mine(p, obs.side).entity == obs.entity), None)
    if pair is not None:
        old = _mine(pair, obs.side)
        if (old.has_value, old.value) == (obs.has_value, obs.value):
            return JoinStep(state)
        new_pair = (obs, pair[1]) if obs.side is Side.LEFT else (pair[0], obs)
        pairs = tuple(new_pair if p is pair else p for p in state.pairs)
        return JoinStep(replace(state, pairs=pairs), [_compare(rule, *new_pair, now)])
    waiting = state.pending(obs.side.other)
    candidates = [o for o in waiting if abs(o.at - obs.at) <= rule.within]
    if candidates:
        def pair_with(c: Observation) -> tuple[Observation, Observation]:
            return (obs, c) if obs.side is Side.LEFT else (c, obs)
        agreeing = [c for c in candidates if _agree(rule, *pair_with(c))]
        chosen = min(agreeing or candidates, key=lambda c: c.at)
        # A pair is one check, and its subject is the left record (the one the rule is about).
        left, right = pair_with(chosen)
        new = state.with_pending(obs.side.other, tuple(o for o in waiting if o is not chosen))
        return JoinStep(replace(new, pairs=(*state.pairs, (left, right))), [_compare(rule, left, right, now)])
    pending = (*mine, obs)
    checks: list[Check] = []
    if len(pending) > MAX_PENDING_PER_KEY:
        oldest, pending = pending[0], pending[1:]
        if rule.is_subject(oldest.side):
            checks.append(_missing(rule, oldest, now, f"more than {MAX_PENDING_PER_KEY} {rule.side(oldest.side).type}"
                                   f" records wait for key {quote(oldest.key)}; the oldest is given up"))
    return JoinStep(state.with_pending(obs.side, pending), checks)


def expire(rule: AuditRule, state: JoinState, *, now: float, detected_at: float | None = None) -> JoinStep:
    """Close the windows that ended before `now`: unpaired subjects are `missing`; the rest is forgotten."""
    detected = now if detected_at is None else detected_at
    checks: list[Check] = []
    kept: dict[Side, tuple[Observation, ...]] = {}
    for which in Side:
        keep = []
        for obs in state.pending(which):
            if obs.at + rule.within < now:
                if rule.is_subject(which):
                    checks.append(_missing(rule, obs, detected))
            else:
                keep.append(obs)
        kept[which] = tuple(keep)
    pairs = tuple(p for p in state.pairs if max(p[0].at, p[1].at) + rule.within >= now)
    if not checks and pairs == state.pairs and kept[Side.LEFT] == state.lefts and kept[Side.RIGHT] == state.rights:
        return JoinStep(state)
    checks.sort(key=lambda c: c.subject.at)
    return JoinStep(JoinState(kept[Side.LEFT], kept[Side.RIGHT], pairs), checks)


# --------------------------------------------------------------------------------------------- clocks and rates


def event_time(time: float | None, verified: float) -> float:
    """When an observation's event happened, for the join: the envelope's own time (`time`, signed with the
    event), but never later than `verified`, its verified record's timestamp (an event cannot happen after it
    was verified: a producer clock running ahead must not push a partition's stream time ahead and close other
    windows early); `verified` when the event has no time."""
    if time is None or not (time < verified and math.isfinite(time)):
        return verified
    return time


#: A source partition of a join: (verified topic, partition).
Source = tuple[str, int]


@dataclass(slots=True)
class Watermark:
    """The time a join partition has reached, its watermark: the least progress over the source partitions that
    feed it (`sources`: every partition of the rule's verified topics), never going back. A source's progress is
    the newest event time of the observations joined from it, or a time it was drained through (`drained`:
    every record that reached it, or the route inputs feeding it, before that time has been joined here), if
    later. So a source whose observations stop coming (a partition the broker refuses writes to, a worker
    stalled upstream) holds every window of the partition open until it has caught up, while the other sources'
    records cannot close them; a source that never sent anything holds it too until it is drained. Until the
    sources are known (`know`: a lookup of the topics' partitions) the watermark stays where it is (`time`;
    None: no window can be due), whatever comes."""

    #: The watermark; None: none yet.
    time: float | None = None
    #: Every source partition that feeds the join partition (more are added as their observations come).
    sources: set[Source] = field(default_factory=set)
    #: Per source, the time it has reached (sources without one hold the watermark).
    progress: dict[Source, float] = field(default_factory=dict)
    #: Whether the sources were looked up (`know`); before, the observations' own sources are not all of them.
    known: bool = False

    def observe(self, source: Source | None, at: float) -> None:
        """An observation timed `at` from `source` (None: it does not say) was joined."""
        if source is None:
            return
        self.sources.add(source)
        self._progress(source, at)

    def drained(self, source: Source, through: float) -> None:
        """Every record of `source` that reached the pipeline before `through` (a wall-clock time) was joined."""
        self._progress(source, through)

    def know(self, sources: Iterable[Source]) -> None:
        """The source partitions that feed the join partition (a lookup of the verified topics' partitions; none:
        only the watermark is brought up to date)."""
        named = set(sources)
        self.sources |= named
        self.known = self.known or bool(named)
        self._advance()

    def behind(self) -> list[Source]:
        """The sources that hold the watermark: those at the least progress (every one without any first)."""
        unknown = sorted(s for s in self.sources if s not in self.progress)
        if unknown or not self.sources:
            return unknown
        low = min(self.progress[s] for s in self.sources)
        return sorted(s for s in self.sources if self.progress[s] == low)

    def _progress(self, source: Source, at: float) -> None:
        old = self.progress.get(source)
        if old is not None and at <= old:
            return
        self.progress[source] = at
        if old is None or self.time is None or old <= self.time:  # else another source holds the watermark
            self._advance()

    def _advance(self) -> None:
        if not self.known:
            return
        low = math.inf
        for source in self.sources:
            at = self.progress.get(source)
            if at is None:
                return
            low = min(low, at)
        if self.time is None or low > self.time:
            self.time = low


@dataclass(slots=True)
class AgreementWindow:
    """Checks made and passed over the last `span` seconds, in `buckets` slices: a rolling agreement rate."""

    span: float = 3600.0
    buckets: int = 60
    _slices: dict[int, list[int]] = field(default_factory=dict)

    def record(self, passed: bool, now: float) -> None:
        """Count one check made at `now`."""
        width = self.span / self.buckets
        slot = int(now // width)
        counts = self._slices.setdefault(slot, [0, 0])
        counts[0] += 1
        counts[1] += int(passed)
        oldest = slot - self.buckets + 1
        for old in [s for s in self._slices if s < oldest]:
            del self._slices[old]

    def counts(self, now: float) -> tuple[int, int]:
        """(checks, passed) within the window ending at `now`."""
        oldest = int(now // (self.span / self.buckets)) - self.buckets + 1
        made = passed = 0
        for slot, (m, p) in self._slices.items():
            if slot >= oldest:
                made += m
                passed += p
        return made, passed

    def rate(self, now: float) -> float | None:
        """Checks passed / checks made in the window; None when none were made."""
        made, passed = self.counts(now)
        return passed / made if made else None


# --------------------------------------------------------------------------------------------- on demand


@dataclass(frozen=True, slots=True)
class ConsistencyResult:
    """The outcome of running a rule over a time range (the seed's ConsistencyResult, with the rate)."""

    rule: str
    since: float
    until: float
    checks: int
    passed: int
    discrepancies: tuple[Discrepancy, ...]
    pending: int

    @property
    def consistent(self) -> bool:
        """No discrepancy found."""
        return not self.discrepancies

    @property
    def agreement(self) -> float | None:
        """Checks passed / checks made; None when nothing was checked."""
        return self.passed / self.checks if self.checks else None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (CLI --json)."""
        return {"rule": self.rule, "since": self.since, "until": self.until, "consistent": self.consistent,
                "checks": self.checks, "passed": self.passed, "agreement": self.agreement,
                "pending": self.pending, "discrepancies": [d.to_dict() for d in self.discrepancies]}


def audit_batch(rule: AuditRule, records: Iterable[Observation | Check], *, since: float, until: float,
                now: float) -> ConsistencyResult:
    """Run a rule over recorded observations: subjects timed in [since, until] are checked against
    counterparts read around them; a subject whose window is still open at `now` is counted as pending."""
    states: dict[str, JoinState] = {}
    checks: list[Check] = []
    for item in sorted(records, key=lambda r: r.subject.at if isinstance(r, Check) else r.at):
        if isinstance(item, Check):
            checks.append(item)
            continue
        step = observe(rule, states.get(item.key, JoinState()), item, now=item.at)
        states[item.key] = step.state
        checks.extend(step.checks)
    pending = 0
    for state in states.values():
        step = expire(rule, state, now=now)
        checks.extend(step.checks)
        pending += sum(1 for which in Side if rule.is_subject(which)
                       for o in step.state.pending(which) if since <= o.at <= until)
    in_range = [c for c in checks if since <= c.subject.at <= until]
    found = tuple(c.discrepancy for c in sorted(in_range, key=lambda c: c.subject.at) if c.discrepancy is not None)
    return ConsistencyResult(rule.name, since, until, len(in_range), sum(1 for c in in_range if c.passed), found,
                             pending)
