"""Causal delivery for one causal scope (Birman-Schiper-Stephenson), as pure functions over state.

Each event carries a vector clock V whose node ids are source services. Per scope the guard keeps D, the
merge of the clocks of every event delivered so far. An event from source s is deliverable when
V[s] == D[s] + 1 and V[k] <= D[k] for every other k: it is the next event of s and everything it saw has
been delivered. Events that arrive early wait in a bounded buffer until their dependencies arrive (and are
released in the same call) or their deadline passes (and they are expired, for quarantine as causal.gap).

Invariant that keeps the buffer cheap: D[s] only grows by delivering (s, D[s] + 1), so at most one held
event per source, the one numbered D[s] + 1, can be the next to go; and each (source, counter) is held at
most once, since a second, different event claiming the same slot is equivocation.

Nothing here reads a clock or does I/O: `now` is a parameter and state is passed in and returned.
"""

from __future__ import annotations

import base64
import binascii
import math
import sys
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final

import orjson

from byzguard.clocks import VectorClock

MissingRange = tuple[str, int, int]
"""A run of events a clock depends on that were not delivered: (node, first counter, last counter)."""

_FORMAT: Final = 1  # version tag of the serialized buffer


class Deliverability(StrEnum):
    """What an event's clock means against a scope's delivered clock."""

    DELIVERABLE = "deliverable"  # every dependency delivered and it is its source's next event
    EARLY = "early"  # some dependency (or an earlier event of its own source) is missing: hold it
    STALE = "stale"  # its clock <= delivered: already delivered, or older than what was
    # Never deliverable, whatever arrives: its source's own entry is 0, or that counter was already
    # delivered while this clock claims dependencies that were not (the source reused a counter).
    INVALID = "invalid"


_DELIVERABLE: Final = Deliverability.DELIVERABLE
_EARLY: Final = Deliverability.EARLY
_STALE: Final = Deliverability.STALE
_INVALID: Final = Deliverability.INVALID


@dataclass(frozen=True, slots=True)
class HeldEvent:
    """An event as the causal buffer sees it; `payload` is opaque here (the caller's record bytes)."""

    event_id: str
    source: str
    clock: VectorClock
    held_at: float
    payload: bytes

    def __post_init__(self) -> None:
        # NaN or infinity would never expire, and JSON cannot carry them.
        if not math.isfinite(self.held_at):
            raise ValueError(f"held_at must be a finite time, got {self.held_at!r}")

    @property
    def counter(self) -> int:
        """This event's position in its source's sequence: its clock's own entry."""
        return self.clock.get(self.source)


@dataclass(frozen=True, slots=True)
class CausalBuffer:
    """The causal state of one scope: the delivered clock and the events held for missing dependencies."""

    delivered: VectorClock = field(default_factory=VectorClock)
    held: tuple[HeldEvent, ...] = ()

    def to_bytes(self) -> bytes:
        """Serialize for the state table (JSON; clocks as header strings, payloads base64)."""
        return orjson.dumps([
            _FORMAT,
            self.delivered.to_header().decode(),
            [
                [h.event_id, h.source, h.clock.to_header().decode(), h.held_at,
                 base64.b64encode(h.payload).decode("ascii")]
                for h in self.held
            ],
        ])

    @classmethod
    def from_bytes(cls, raw: bytes) -> CausalBuffer:
        """Deserialize what `to_bytes` wrote; raise ValueError when the bytes are not such a value."""
        try:
            version, delivered, held = orjson.loads(raw)
            if version != _FORMAT:
                raise ValueError(f"unknown format version {version!r}")
            return cls(
                # The stored clocks are merges the guard computed, not producer input: no entry bound.
                delivered=VectorClock.from_header(delivered, max_entries=sys.maxsize),
                held=tuple(
                    HeldEvent(
                        event_id=_str(event_id),
                        source=_str(source),
                        clock=VectorClock.from_header(clock, max_entries=sys.maxsize),
                        held_at=_number(held_at),
                        payload=base64.b64decode(_str(payload), validate=True),
                    )
                    for event_id, source, clock, held_at, payload in held
                ),
            )
        except (ValueError, TypeError, binascii.Error) as exc:  # ClockError and JSONDecodeError included
            raise ValueError(f"corrupt causal buffer state: {exc}") from exc


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class OfferResult:
    """The outcome of offering one event to a scope's buffer.

    `released` are the events to deliver now, in causal order; their clocks are already merged into
    `buffer.delivered`. `overflow` is the offered event when it had to wait but the buffer was full.
    """

    buffer: CausalBuffer
    status: Deliverability
    released: list[HeldEvent] = field(default_factory=list)
    overflow: HeldEvent | None = None

    @property
    def stale(self) -> bool:
        """True when the event was already delivered (or held) with this clock, or is older: a no-op."""
        return self.status is _STALE


def classify(delivered: VectorClock, source: str, clock: VectorClock) -> Deliverability:
    """Whether an event from `source` stamped `clock` can be delivered now, must wait, or is stale."""
    theirs = clock.entries()
    d_get = delivered.entries().get
    own = theirs.get(source, 0)
    if own == 0:
        return _INVALID
    d_own = d_get(source, 0)
    if own <= d_own:
        return _STALE if delivered.descends(clock) else _INVALID
    for node, counter in theirs.items():
        if counter > d_get(node, 0) and node != source:
            return _EARLY
    return _DELIVERABLE if own == d_own + 1 else _EARLY


def missing(delivered: VectorClock, source: str, clock: VectorClock) -> list[MissingRange]:
    """The undelivered events `clock` depends on, as (node, first, last) counter ranges sorted by node."""
    theirs = clock.entries()
    d_get = delivered.entries().get
    ranges: list[MissingRange] = []
    for node in sorted(theirs):
        # The event itself is not its own dependency: for its source only the earlier counters count.
        last = theirs[node] - 1 if node == source else theirs[node]
        first = d_get(node, 0) + 1
        if last >= first:
            ranges.append((node, first, last))
    return ranges


def offer(buf: CausalBuffer, event: HeldEvent, *, now: float, max_held: int) -> OfferResult:
    """Offer an event to the scope: deliver it and whatever it unblocks, hold it, or report it.

    An event that has to wait is held from `now` (its `held_at` is set to `now`). STALE and INVALID
    events, and duplicates of held ones, change nothing; the caller routes them.
    """
    status = classify(buf.delivered, event.source, event.clock)
    if status is _STALE or status is _INVALID:
        return OfferResult(buf, status)
    counter = event.counter
    for h in buf.held:
        if h.source == event.source and h.counter == counter:
            # The slot is taken: the same clock again is a duplicate, another clock is equivocation.
            return OfferResult(buf, _STALE if h.clock == event.clock else _INVALID)
    if status is _EARLY:
        if len(buf.held) >= max_held:
            return OfferResult(buf, status, overflow=event)
        if event.held_at != now:
            event = replace(event, held_at=now)
        return OfferResult(CausalBuffer(buf.delivered, (*buf.held, event)), status)
    delivered = buf.delivered.merge(event.clock)
    released = [event]
    held = buf.held
    if held:
        delivered, held = _release(delivered, held, released)
    return OfferResult(CausalBuffer(delivered, held), status, released)


def _release(
    delivered: VectorClock, held: tuple[HeldEvent, ...], released: list[HeldEvent]
) -> tuple[VectorClock, tuple[HeldEvent, ...]]:
    # Per the module invariant only (s, D[s] + 1) can be next for each source s, so each round looks at
    # one candidate per source instead of rescanning the whole buffer. Among the deliverable candidates
    # the longest held goes first: any choice respects causality, this one is fair and deterministic.
    by_slot = {(h.source, h.counter): i for i, h in enumerate(held)}
    sources = list(dict.fromkeys(h.source for h in held))
    gone: set[int] = set()
    while True:
        best = -1
        for source in sources:
            i = by_slot.get((source, delivered.get(source) + 1), -1)
            if (
                i >= 0
                and (best < 0 or i < best)
                and classify(delivered, source, held[i].clock) is _DELIVERABLE
            ):
                best = i
        if best < 0:
            break
        event = held[best]
        delivered = delivered.merge(event.clock)
        released.append(event)
        gone.add(best)
    return delivered, tuple(h for i, h in enumerate(held) if i not in gone)


def expire(
    buf: CausalBuffer, *, now: float, deadline_s: float
) -> tuple[CausalBuffer, list[tuple[HeldEvent, list[MissingRange]]]]:
    """Take out the events held longer than `deadline_s`, each with its missing ranges (for causal.gap).

    Events that depend on an expired one stay held: they expire on their own deadline, or are released
    if the missing events arrive after all (for instance replayed from quarantine).
    """
    expired: list[tuple[HeldEvent, list[MissingRange]]] = []
    kept: list[HeldEvent] = []
    for h in buf.held:
        if now - h.held_at > deadline_s:
            expired.append((h, missing(buf.delivered, h.source, h.clock)))
        else:
            kept.append(h)
    if not expired:
        return buf, expired
    return CausalBuffer(buf.delivered, tuple(kept)), expired


def oldest_held_age(buf: CausalBuffer, *, now: float) -> float:
    """Seconds the longest-held event has waited (0.0 when nothing is held), for the buffer-age gauge."""
    if not buf.held:
        return 0.0
    return max(0.0, now - min(h.held_at for h in buf.held))
