"""Contract checks: run a producer's sample through a route's checks, in order, and say what byzguard would do.

The guard's own decision function (`byzguard.guard.Guard.process`) runs on every record, over in-memory
state that starts empty or from a snapshot of the live state, and applies its own writes as the worker
does: a version regression or a duplicate inside the sample is caught exactly as it would be live. Every
event that would be quarantined, forwarded as suspect, warned about or dropped as a duplicate becomes a
`Finding` with its reasons (check, code, severity, detail). Nothing here does I/O beyond reading the
configuration file; nothing imports faust or a Kafka client.

    contract = load_contract("byzguard.yaml", route="prices", secrets={"pricing-1": "test-secret"})
    report = contract.check(records)          # RecordIn, Stamped, (key, value, headers), dicts...
    assert report.passed, report.format()
"""

from __future__ import annotations

import os
import time as _time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import ValidationError

from byzguard import config as guard_config
from byzguard.config import FileModel, GuardConfig, Route
from byzguard.errors import ConfigError
from byzguard.guard import CAUSAL, ENTITIES, HELD_INDEX_KEY, LAMPORTS, Guard, RecordIn, Result, Routed
from byzguard.integrity import Key, KeyRing
from byzguard.processor import MemoryTable, VerifyProcessor
from byzguard.state import decode_lamport
from byzguard.verdict import Code, Outcome, Reason, Severity

from .sample import as_record

__all__ = [
    "Contract",
    "ContractError",
    "ContractReport",
    "Finding",
    "Snapshot",
    "contract_from_text",
    "load_contract",
    "record_clock",
]

Clock = float | Callable[[RecordIn], float] | None
"""`now` for each record: a fixed time, a function of the record, or None (the wall clock, read once)."""

_REJECTED = frozenset({Outcome.QUARANTINED, Outcome.SUSPECT})
_ORDER = (Outcome.VERIFIED, Outcome.WARNED, Outcome.SUSPECT, Outcome.QUARANTINED, Outcome.DUPLICATE,
          Outcome.HELD)


class ContractError(ConfigError):
    """The contract cannot be set up: unknown route, unreadable configuration."""


# --------------------------------------------------------------------------- state


#: Changelog topic `<app_id>-<route>-<suffix>-changelog` -> the guard's table name.
CHANGELOG_TABLES: Mapping[str, str] = {"state_by_entity": ENTITIES, "lamport_by_source": LAMPORTS,
                                       "causal_by_entity": CAUSAL}

Tables = dict[str, dict[bytes, bytes]]


@dataclass
class Snapshot:
    """Guard state per table and partition, as the worker's tables (and their changelogs) hold it.

    `tables[name][partition][key] = value`, name one of `byzguard.guard`'s ENTITIES, LAMPORTS, CAUSAL.
    Built from the route's changelog topics (last value per key wins, a tombstone deletes) or by a
    previous check (`ContractReport.state`).
    """

    tables: dict[str, dict[int, dict[bytes, bytes]]] = field(default_factory=dict)

    def put(self, table: str, partition: int, key: bytes, value: bytes | None) -> None:
        """Apply one changelog record; a None value is a tombstone."""
        part = self.tables.setdefault(table, {}).setdefault(partition, {})
        if value is None:
            part.pop(key, None)
        else:
            part[key] = value

    def partition(self, partition: int) -> Tables:
        """A copy of one partition's tables."""
        return {name: dict(parts.get(partition, {})) for name, parts in self.tables.items()}

    def merged(self) -> Tables:
        """All partitions as one state: entities and buffers united, each source's highest Lamport mark."""
        out: Tables = {}
        for name, parts in self.tables.items():
            table: dict[bytes, bytes] = {}
            held_index: dict[str, int] = {}
            for part in sorted(parts):
                for key, raw in parts[part].items():
                    if name == LAMPORTS:
                        old, new = decode_lamport(table.get(key)), decode_lamport(raw)
                        if new is not None and (old is None or new > old):
                            table[key] = raw
                    elif name == CAUSAL and key == HELD_INDEX_KEY:
                        held_index.update(orjson.loads(raw))
                    else:
                        table[key] = raw
            if held_index:
                table[HELD_INDEX_KEY] = orjson.dumps(held_index)
            out[name] = table
        return out

    def __len__(self) -> int:
        return sum(len(t) for parts in self.tables.values() for t in parts.values())


class _State:
    """The tables the check reads and writes: per partition, or one set for the whole sample (-1)."""

    def __init__(self, snapshot: Snapshot | None, partitioned: bool) -> None:
        self.partitioned = partitioned
        self.parts: dict[int, Tables] = {}
        self._views: dict[int, dict[str, MemoryTable]] = {}
        if snapshot is not None:
            if partitioned:
                every = {p for parts in snapshot.tables.values() for p in parts}
                self.parts = {p: snapshot.partition(p) for p in every}
            else:
                self.parts = {-1: snapshot.merged()}

    def tables(self, partition: int) -> Tables:
        tables = self.parts.setdefault(partition if self.partitioned else -1, {})
        for name in (ENTITIES, LAMPORTS, CAUSAL):
            tables.setdefault(name, {})
        return tables

    def views(self, partition: int) -> dict[str, MemoryTable]:
        """The processor's views of one partition's tables (over the same dicts, so the snapshot sees them)."""
        key = partition if self.partitioned else -1
        found = self._views.get(key)
        if found is None:
            found = self._views[key] = {name: MemoryTable(table) for name, table in self.tables(key).items()}
        return found

    def snapshot(self) -> Snapshot:
        out = Snapshot()
        for p, tables in self.parts.items():
            for name, table in tables.items():
                out.tables.setdefault(name, {})[p] = dict(table)
        return out


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Finding:
    """One event byzguard would not simply pass: where it is in the sample, what it is, and why."""

    index: int
    where: str
    key: str | None
    event_id: str | None
    event_type: str | None
    source: str | None
    outcome: Outcome
    reasons: tuple[Reason, ...]

    @property
    def rejected(self) -> bool:
        """True when the event would be quarantined (or, on a fail-open route, forwarded marked suspect)."""
        return self.outcome in _REJECTED

    @property
    def codes(self) -> tuple[str, ...]:
        """The reason codes, in the order the checks found them."""
        return tuple(r.code.value for r in self.reasons)

    def title(self) -> str:
        """One line naming the event and its outcome."""
        parts = [self.where]
        if self.key is not None:
            parts.append(f"key={self.key!r}")
        if self.event_type:
            parts.append(f"type={self.event_type}")
        if self.source:
            parts.append(f"source={self.source}")
        if self.event_id:
            parts.append(f"id={self.event_id}")
        return " ".join(parts) + f" -> {self.outcome.value}"

    def describe(self) -> str:
        """The title, then one indented line per reason: code (check, severity): detail."""
        lines = [self.title()]
        lines.extend(f"    {r.code.value} ({r.check}, {r.severity.value}): {r.detail}" for r in self.reasons)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"index": self.index, "where": self.where, "key": self.key, "id": self.event_id,
                "type": self.event_type, "source": self.source, "outcome": self.outcome.value,
                "reasons": [r.as_dict() for r in self.reasons]}


@dataclass(frozen=True)
class ContractReport:
    """What byzguard's route would do with a sample: counts per outcome and every finding, in order."""

    route: str
    config_path: str
    total: int
    outcomes: Mapping[Outcome, int]
    findings: tuple[Finding, ...]
    notes: tuple[str, ...] = ()
    state: Snapshot = field(default_factory=Snapshot, repr=False, compare=False)

    @property
    def rejected(self) -> tuple[Finding, ...]:
        """Events that would be quarantined (or forwarded as suspect on a fail-open route)."""
        return tuple(f for f in self.findings if f.rejected)

    @property
    def warned(self) -> tuple[Finding, ...]:
        """Events that would be forwarded with warnings."""
        return tuple(f for f in self.findings if f.outcome is Outcome.WARNED)

    @property
    def duplicates(self) -> tuple[Finding, ...]:
        """Events that would be dropped as duplicates (and counted)."""
        return tuple(f for f in self.findings if f.outcome is Outcome.DUPLICATE)

    @property
    def passed(self) -> bool:
        """True when no event of the sample would be rejected."""
        return not self.rejected

    def code_counts(self) -> dict[str, int]:
        """How often each code was found, most frequent first."""
        return dict(Counter(code for f in self.findings for code in f.codes).most_common())

    def summary(self) -> str:
        """One line: route, totals per outcome, the codes found."""
        counts = ", ".join(f"{self.outcomes.get(o, 0)} {o.value}" for o in _ORDER
                           if self.outcomes.get(o, 0) or o in (Outcome.VERIFIED, Outcome.QUARANTINED))
        codes = ", ".join(f"{c} x{n}" for c, n in self.code_counts().items())
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: route {self.route!r}: {self.total} event(s): {counts}"
                + (f"; codes: {codes}" if codes else ""))

    def format(self, *, warnings: bool = True, duplicates: bool = True, limit: int | None = None) -> str:
        """The summary and each finding (rejected first, then warned, then duplicates) as readable text."""
        shown = [*self.rejected, *(self.warned if warnings else ()), *(self.duplicates if duplicates else ())]
        lines = [f"byzguard contract, {self.config_path}: {self.summary()}"]
        for finding in shown[:limit]:
            lines.append("  " + finding.describe().replace("\n", "\n  "))
        if limit is not None and len(shown) > limit:
            lines.append(f"  ... and {len(shown) - limit} more")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"route": self.route, "config": self.config_path, "total": self.total, "passed": self.passed,
                "outcomes": {o.value: n for o, n in self.outcomes.items()},
                "codes": self.code_counts(), "findings": [f.as_dict() for f in self.findings],
                "notes": list(self.notes)}


# --------------------------------------------------------------------------- the contract


def record_clock(fallback: float | None = None) -> Callable[[RecordIn], float]:
    """`now` = the record's own timestamp (when the broker got it), else `fallback` (default: wall clock)."""
    default = _time.time() if fallback is None else fallback

    def clock(record: RecordIn) -> float:
        return record.timestamp if record.timestamp is not None else default

    return clock


@dataclass(frozen=True)
class Contract:
    """A route of a configuration, ready to check samples against."""

    config: GuardConfig
    route: Route
    missing_keys: Mapping[str, str] = field(default_factory=dict)

    def check(
        self,
        records: Iterable[object],
        *,
        snapshot: Snapshot | None = None,
        now: Clock = None,
        labels: Sequence[str] | None = None,
        partitioned: bool = False,
        key_field: str | None = None,
        expire_held: bool = False,
    ) -> ContractReport:
        """Run every record through the route's checks in order, state carried from one to the next.

        `snapshot` is the state to start from (default: empty). `partitioned` keeps state per record
        partition, as the worker's co-partitioned tables do (for samples read from Kafka); otherwise the
        sample shares one state. `labels` name the records in findings (default `#<index>`).

        On routes with a causal buffer, events are held and released as live; an event still held at the
        end of the sample is reported as `held` (a warning), or with `expire_held` quarantined as
        `causal.gap` as the guard would once the route's deadline passes without its dependencies.
        """
        run = _Run(self, snapshot, partitioned, labels)
        clock = _clock(now)
        topic = self.route.inputs[0]
        last_now: float | None = None
        for index, item in enumerate(records):
            record = as_record(item, index=index, topic=topic, key_field=key_field)
            # The offset names the record inside the run (held records come back from the causal buffer
            # as bytes); a negative one cannot collide with a real record held in a snapshot.
            record = replace(record, topic=record.topic or topic, offset=-(index + 1))
            at = clock(record)
            run.tick(at)
            run.feed(record, at)
            last_now = at
        if expire_held and last_now is not None:
            run.expire(last_now + self.route.causal.deadline + 0.001)
        return run.report()

    def notes(self) -> tuple[str, ...]:
        """What the check cannot see as the live guard would."""
        notes = []
        if self.missing_keys:
            notes.append("no secret for MAC key(s) " + ", ".join(f"{k} ({hint})" for k, hint in
                         sorted(self.missing_keys.items())) + ": events signed with them fail integrity here")
        return tuple(notes)

    def explain(self, reasons: tuple[Reason, ...], key_id: str | None) -> tuple[Reason, ...]:
        """Reasons, with unknown-key details saying when the key is declared but its secret was not given."""
        if key_id is None or key_id not in self.missing_keys:
            return reasons
        return tuple(self._explain_missing_key(r, key_id) for r in reasons)

    def _explain_missing_key(self, reason: Reason, key_id: str | None) -> Reason:
        if reason.code is not Code.INTEGRITY_UNKNOWN_KEY or key_id is None:
            return reason
        return Reason(reason.code, f"{reason.detail}: the configuration declares it, but this check has no "
                      f"secret for it ({self.missing_keys[key_id]})", reason.severity)


def _clock(now: Clock) -> Callable[[RecordIn], float]:
    if now is None or isinstance(now, int | float):
        fixed = _time.time() if now is None else float(now)
        return lambda _record: fixed
    return now


class _Run:
    """One pass of a sample: state, the latest routing of each record, and the causal deadline ticks."""

    def __init__(self, contract: Contract, snapshot: Snapshot | None, partitioned: bool,
                 labels: Sequence[str] | None) -> None:
        self.contract = contract
        self.guard = Guard(contract.config)
        self.route = contract.route
        self.state = _State(snapshot, partitioned)
        self.labels = labels
        self.total = 0
        # Sample index -> its latest routing (a held record is routed again when released).
        self.final: dict[int, Routed] = {}
        # Records held in the snapshot and released (or expired) by this run, in order.
        self.foreign: list[Routed] = []
        self.processor = VerifyProcessor(self.guard, self.route)
        self.tick_every = self.processor.interval
        self.last_tick: float | None = None

    def feed(self, record: RecordIn, now: float) -> None:
        self.total += 1
        self.collect(self.processor.process(record, self.state.views(record.partition), now))

    def tick(self, now: float) -> None:
        """Expire held records past their deadline, as the worker punctuates (every deadline/4, 0.5 to 5 s)."""
        if self.tick_every is None:
            return
        if self.last_tick is None:
            self.last_tick = now
        elif now - self.last_tick >= self.tick_every:
            self.expire(now)
            self.last_tick = now

    def expire(self, now: float) -> None:
        for partition in list(self.state.parts):
            self.collect(self.processor.punctuate(self.state.views(partition), now))

    def collect(self, result: Result) -> None:
        for routed in result.routed:
            offset = routed.record.offset
            if offset < 0:
                self.final[-offset - 1] = routed
            else:
                self.foreign.append(routed)

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels is not None and index < len(self.labels) else f"#{index}"

    def finding(self, index: int, where: str, routed: Routed) -> Finding | None:
        decision = routed.decision
        if decision.outcome is Outcome.VERIFIED and not decision.reasons:
            return None
        env = routed.envelope
        reasons = decision.reasons
        if decision.outcome is Outcome.HELD and not reasons:
            reasons = (Reason(Code.CAUSAL_GAP, "still held for missing dependencies at the end of the sample; "
                              f"live, it is quarantined as causal.gap after {self.route.causal.deadline:g}s "
                              "unless they arrive", Severity.WARN),)
        return Finding(
            index=index,
            where=where,
            key=_text(routed.record.key),
            event_id=env.id if env is not None else None,
            event_type=env.type if env is not None else None,
            source=env.source if env is not None else None,
            outcome=decision.outcome,
            reasons=self.contract.explain(reasons, env.checksum.key_id
                                          if env is not None and env.checksum is not None else None),
        )

    def report(self) -> ContractReport:
        outcomes: Counter[Outcome] = Counter(r.decision.outcome for r in self.final.values())
        findings = [f for i in sorted(self.final) if (f := self.finding(i, self.label(i), self.final[i]))]
        for routed in self.foreign:
            rec = routed.record
            found = self.finding(-1, f"snapshot-held {rec.topic}[{rec.partition}]@{rec.offset}", routed)
            if found is not None:
                findings.append(found)
        return ContractReport(self.route.name, self.contract.config.source_path, self.total, dict(outcomes),
                              tuple(findings), self.contract.notes(), self.state.snapshot())


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.hex()


# --------------------------------------------------------------------------- loading


def load_contract(
    config: str | os.PathLike[str] | GuardConfig,
    route: str | None = None,
    *,
    secrets: Mapping[str, str | bytes] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Contract:
    """The contract of `route` (a route name or one of its input topics; optional with a single route).

    MAC secrets come from `secrets` (key id -> secret), else from the key's environment variable or file
    as the worker reads them. A key whose secret is nowhere does not stop the check: it is left out of the
    key ring and named in the report, since a producer's tests rarely hold every other service's secret.
    """
    if isinstance(config, GuardConfig):
        return Contract(config, select_route(config, route))
    path = Path(config)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ContractError(f"{path}: cannot read the configuration: {exc}") from exc
    return contract_from_text(text, route, source_path=str(path), secrets=secrets, environ=environ)


def contract_from_text(
    text: str,
    route: str | None = None,
    *,
    source_path: str = "<memory>",
    secrets: Mapping[str, str | bytes] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Contract:
    """As `load_contract`, from configuration text."""
    env = os.environ if environ is None else environ
    try:
        raw = guard_config.read_yaml(text)
        model = FileModel.model_validate(raw if raw is not None else {})
    except (yaml.YAMLError, ValidationError):
        # The guard's own loader words the same fault with file:line and the field path.
        guard_config.loads(text, source_path=source_path, environ=env)
        raise  # pragma: no cover - loads raised
    keys: dict[str, Key] = {}
    missing: dict[str, str] = {}
    for key_id, spec in model.keys.items():
        secret, hint = _secret(key_id, spec.secret_env, spec.secret_file, secrets or {}, env)
        if secret:
            keys[key_id] = Key(key_id, spec.source, secret)
        else:
            missing[key_id] = hint
    compiled = guard_config.build(model.model_copy(update={"keys": {}}), source_path=source_path)
    compiled = replace(compiled, keyring=KeyRing(keys))
    return Contract(compiled, select_route(compiled, route), missing)


def _secret(key_id: str, secret_env: str | None, secret_file: str | None,
            secrets: Mapping[str, str | bytes], env: Mapping[str, str]) -> tuple[bytes, str]:
    given = secrets.get(key_id)
    if given is not None:
        return (given.encode() if isinstance(given, str) else bytes(given)), ""
    if secret_env:
        value = env.get(secret_env)
        return (value.encode() if value else b""), f"set {secret_env} or pass secrets={{{key_id!r}: ...}}"
    if secret_file:
        try:
            return Path(secret_file).read_bytes().strip(), ""
        except OSError:
            return b"", f"{secret_file} is not readable; pass secrets={{{key_id!r}: ...}}"
    return b"", f"pass secrets={{{key_id!r}: ...}}"


def select_route(config: GuardConfig, route: str | None) -> Route:
    """The route named `route`, or reading the topic `route`, or the only route; ContractError otherwise."""
    names = [r.name for r in config.routes]
    if route is None:
        if len(config.routes) == 1:
            return config.routes[0]
        raise ContractError(f"{config.source_path}: name a route: {names}")
    for r in config.routes:
        if r.name == route:
            return r
    by_topic = config.route_by_input.get(route)
    if by_topic is not None:
        return by_topic
    raise ContractError(f"{config.source_path}: no route {route!r}; routes: {names}")

