"""One record in, routing out: decode, read state, verify, and say what to send and what to write.

The same function serves the worker's agent, the contract checker and the benchmarks; the state is
anything with `get(bytes) -> bytes | None` (a faust table, a dict, a snapshot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from byzguard.config import GuardConfig, Route
from byzguard.engine import Decision, Limits, decode_failure, verify
from byzguard.envelope import Envelope, decode
from byzguard.routing import Headers, quarantine_headers, verified_headers
from byzguard.state import EntityState, decode_lamport, encode_lamport


class StateReader(Protocol):
    """The read side of a state table."""

    def get(self, key: bytes) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class RecordIn:
    """A consumed record and its coordinates."""

    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    topic: str
    partition: int
    offset: int
    timestamp: float | None = None


@dataclass(frozen=True, slots=True)
class Routed:
    """What to do with one record: headers for each destination (None: not sent there) and state writes."""

    decision: Decision
    envelope: Envelope | None
    verified_headers: Headers | None
    quarantine_headers: Headers | None
    entity_key: bytes | None = None
    entity_value: bytes | None = None
    lamport_key: bytes | None = None
    lamport_value: bytes | None = None


class Guard:
    """Verifies records of every route of a configuration."""

    __slots__ = ("config", "limits")

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.limits = Limits(config.ids_per_entity, config.id_window)

    def process(
        self,
        record: RecordIn,
        route: Route,
        entities: StateReader,
        lamports: StateReader,
        *,
        now: float,
    ) -> Routed:
        """Decide one record's fate against the given state; never raises for a bad record."""
        decoded = decode(record.key, record.value, record.headers, default_type=route.default_type)
        if isinstance(decoded, tuple):
            return self._route(record, route, decode_failure(*decoded), None, now)
        env = decoded
        entity_key = env.subject.encode()
        raw_entity = entities.get(entity_key)
        entity = EntityState.from_bytes(raw_entity) if raw_entity else None
        lamport_key = env.source.encode()
        mark = decode_lamport(lamports.get(lamport_key)) if env.lamport is not None else None
        decision = verify(env, route.policy_for(env.type), entity, mark, self.config.keyring,
                          now=now, limits=self.limits)
        return self._route(record, route, decision, env, now,
                           entity_key=entity_key, lamport_key=lamport_key)

    def _route(
        self,
        record: RecordIn,
        route: Route,
        decision: Decision,
        env: Envelope | None,
        now: float,
        *,
        entity_key: bytes | None = None,
        lamport_key: bytes | None = None,
    ) -> Routed:
        forward = verified_headers(record.headers, decision.outcome, decision.reasons, route.name, now) \
            if decision.forward else None
        quarantine = quarantine_headers(
            record.headers, decision.outcome, decision.reasons, route.name, topic=record.topic,
            partition=record.partition, offset=record.offset, timestamp=record.timestamp, now=now,
        ) if decision.quarantine else None
        return Routed(
            decision=decision,
            envelope=env,
            verified_headers=forward,
            quarantine_headers=quarantine,
            entity_key=entity_key if decision.entity is not None else None,
            entity_value=decision.entity.to_bytes() if decision.entity is not None else None,
            lamport_key=lamport_key if decision.lamport is not None else None,
            lamport_value=encode_lamport(decision.lamport) if decision.lamport is not None else None,
        )
