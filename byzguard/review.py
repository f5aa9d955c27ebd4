"""Quarantine review as data: decision records, each record's status, replay and recheck headers, filters,
and reviewer authentication. Pure: no faust, no kafka; app/review moves the bytes.

The decisions topic is compacted and keyed by quarantine id, so only the last value of a key survives. Each
value therefore carries the record's whole decision history, and every writer appends to the history it
read (app/review serializes writers with one transactional id, see app/review/store.py). The length of the
history is the record's version: a reader ignores a value shorter than the one it already holds.

Status of a quarantined record, derived from its last decision value:

    pending ──approve──> approved ──(replay: delivered + marker, one transaction)──> replayed (final)
       │  └──reject───> rejected ──approve──> approved ...   (approve/reject may change until delivery)
       └────recheck───> rechecked (final: re-sent to its input; a new quarantine id if it fails again)
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from byzguard import routing
from byzguard.envelope import decode
from byzguard.errors import ByzguardError
from byzguard.routing import Headers
from byzguard.state import EntityState

H_REPLAYED = "byzguard_replayed"
H_REVIEWER = "byzguard_reviewer"
H_DECIDED_AT = "byzguard_decided_at"
H_REPLAYED_AT = "byzguard_replayed_at"
H_RECHECK_OF = "byzguard_recheck_of"
VERDICT_APPROVED = b"approved"

DECISION_FORMAT = 1
MAX_NOTE = 2000
MAX_REVIEWER = 100


class ReviewError(ByzguardError):
    """Root of review errors (ByzguardError -> ReviewError -> NotAuthenticatedError / BadFilterError)."""


class NotAuthenticatedError(ReviewError):
    """A review request without valid credentials: refused, never recorded."""


class BadFilterError(ReviewError, ValueError):
    """A filter value that cannot be parsed (an unknown status, a time that is not a time)."""


class Action(StrEnum):
    """What a decision entry says. REPLAYED is written only together with the delivered record."""

    APPROVE = "approve"
    REJECT = "reject"
    RECHECK = "recheck"
    REPLAYED = "replayed"


REVIEW_ACTIONS = (Action.APPROVE, Action.REJECT, Action.RECHECK)


class Status(StrEnum):
    """Where a quarantined record stands in review."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    REPLAYED = "replayed"
    RECHECKED = "rechecked"


FINAL = frozenset({Status.REPLAYED, Status.RECHECKED})


@dataclass(frozen=True, slots=True)
class DecisionEntry:
    """One step of a record's review: who did what, when, why, and (replay, recheck) where it wrote."""

    action: Action
    reviewer: str
    at: float
    note: str = ""
    target: str = ""  # replayed: "<topic>-<partition>-<offset>" on verified; recheck: the re-sent input record

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"action": self.action.value, "reviewer": self.reviewer, "at": self.at, "note": self.note,
                "target": self.target}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DecisionEntry:
        """Inverse of as_dict."""
        return cls(Action(raw["action"]), str(raw["reviewer"]), float(raw["at"]), str(raw.get("note", "")),
                   str(raw.get("target", "")))


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """The value of a decisions-topic record: a quarantined record's whole decision history, newest last."""

    quarantine_id: str
    route: str
    history: tuple[DecisionEntry, ...]

    @property
    def latest(self) -> DecisionEntry:
        """The newest entry."""
        return self.history[-1]

    def with_entry(self, entry: DecisionEntry) -> DecisionRecord:
        """This record with one more entry."""
        return replace(self, history=(*self.history, entry))

    def last(self, action: Action) -> DecisionEntry | None:
        """The newest entry of one action, if any."""
        return next((e for e in reversed(self.history) if e.action is action), None)

    def to_bytes(self) -> bytes:
        """Serialize; the latest entry is repeated at the top level for people reading the topic."""
        return orjson.dumps({"v": DECISION_FORMAT, "quarantine_id": self.quarantine_id, "route": self.route,
                             **self.latest.as_dict(), "history": [e.as_dict() for e in self.history]})

    @classmethod
    def from_bytes(cls, raw: bytes) -> DecisionRecord:
        """Deserialize; ValueError (or KeyError) when the value is not a decision record."""
        obj = orjson.loads(raw)
        if not isinstance(obj, dict) or obj.get("v") != DECISION_FORMAT or not obj.get("history"):
            raise ValueError("not a byzguard decision record")
        return cls(str(obj["quarantine_id"]), str(obj["route"]),
                   tuple(DecisionEntry.from_dict(e) for e in obj["history"]))


def new_decision(current: DecisionRecord | None, entry: DecisionEntry, *, quarantine_id: str,
                 route: str) -> DecisionRecord:
    """The record to write after `current` (None: the first decision)."""
    if current is None:
        return DecisionRecord(quarantine_id, route, (entry,))
    return current.with_entry(entry)


def status_of(decision: DecisionRecord | None) -> Status:
    """The review status a decision history leads to; delivery and recheck are final."""
    if decision is None:
        return Status.PENDING
    actions = {e.action for e in decision.history}
    if Action.REPLAYED in actions:
        return Status.REPLAYED
    if Action.RECHECK in actions:
        return Status.RECHECKED
    latest = next(e for e in reversed(decision.history) if e.action in (Action.APPROVE, Action.REJECT))
    return Status.APPROVED if latest.action is Action.APPROVE else Status.REJECTED


class Plan(StrEnum):
    """What a review action does to a record in a given status."""

    APPLY = "apply"
    UNCHANGED = "unchanged"
    REFUSED = "refused"


def plan(status: Status, action: Action) -> tuple[Plan, str]:
    """Whether `action` may be taken on a record in `status`, with the reason when it may not."""
    if action not in REVIEW_ACTIONS:
        return Plan.REFUSED, f"{action} is written by replay, not by a reviewer"
    if status is Status.REPLAYED:
        return Plan.REFUSED, "already delivered to the verified topic"
    if status is Status.RECHECKED:
        return Plan.REFUSED, "already re-sent through the checks; review the new quarantine record instead"
    if (status, action) in ((Status.APPROVED, Action.APPROVE), (Status.REJECTED, Action.REJECT)):
        return Plan.UNCHANGED, f"already {status}"
    return Plan.APPLY, ""


# --------------------------------------------------------------------------- quarantined records


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw is not None else ""


def _float(raw: bytes | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def _int(raw: bytes | None, default: int) -> int:
    try:
        return int(raw) if raw else default
    except ValueError:
        return default


@dataclass(frozen=True, slots=True)
class QuarantinedRecord:
    """One record read from a quarantine topic: the original bytes, the reasons and both coordinates."""

    quarantine_id: str
    route: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    topic: str
    partition: int
    offset: int
    timestamp: float | None
    reasons: tuple[Mapping[str, str], ...]
    original_topic: str
    original_partition: int
    original_offset: int
    original_timestamp: float | None
    detected_at: float | None
    source: str
    type: str
    entity: str
    event_id: str
    recheck_of: str | None = None

    @property
    def codes(self) -> tuple[str, ...]:
        """The reason codes, in order."""
        return tuple(r.get("code", "") for r in self.reasons)

    @property
    def is_stub(self) -> bool:
        """True for a stub that stands for a record too large to copy (`output.too_large`): its value is a
        pointer to the original, never the original, so it can be rejected but not approved or re-sent."""
        return any(k == routing.H_STUB for k, _ in self.headers)

    @property
    def time(self) -> float | None:
        """When it was quarantined (detection time, else the original record's time)."""
        return self.detected_at if self.detected_at is not None else self.original_timestamp

    def producer_headers(self) -> Headers:
        """The headers the producer sent, without anything byzguard added."""
        return routing.original_headers(self.headers)


def parse_quarantined(key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]] | None, *,
                      topic: str, partition: int, offset: int, timestamp: float | None,
                      default_type: Mapping[str, str] | None = None) -> QuarantinedRecord | None:
    """A quarantine-topic record as review sees it; None when it carries no quarantine id."""
    hdrs = tuple((k, v if v is not None else b"") for k, v in (headers or ()))
    by_name = dict(hdrs)
    qid = _text(by_name.get(routing.H_QUARANTINE_ID))
    if not qid:
        return None
    route = _text(by_name.get(routing.H_ROUTE))
    try:
        reasons = tuple(routing.decode_reasons(by_name[routing.H_REASONS])) if routing.H_REASONS in by_name else ()
    except (orjson.JSONDecodeError, TypeError):
        reasons = ({"check": "review", "code": "review.unreadable_reasons", "severity": "reject",
                    "detail": _text(by_name.get(routing.H_REASONS))},)
    env = decode(key, value, routing.original_headers(hdrs), default_type=(default_type or {}).get(route, ""))
    if isinstance(env, tuple):
        source = _text(by_name.get("ce_source")) or "unknown"
        event_type = _text(by_name.get("ce_type")) or "unknown"
        entity = _text(by_name.get("ce_subject")) or _text(key)
        event_id = _text(by_name.get("ce_id"))
    else:
        source, event_type, entity, event_id = env.source, env.type, env.subject, env.id
    return QuarantinedRecord(
        quarantine_id=qid, route=route, key=key, value=value, headers=hdrs, topic=topic, partition=partition,
        offset=offset, timestamp=timestamp, reasons=reasons,
        original_topic=_text(by_name.get(routing.H_ORIGINAL_TOPIC)),
        original_partition=_int(by_name.get(routing.H_ORIGINAL_PARTITION), partition),
        original_offset=_int(by_name.get(routing.H_ORIGINAL_OFFSET), -1),
        original_timestamp=_float(by_name.get(routing.H_ORIGINAL_TIMESTAMP)),
        detected_at=_float(by_name.get(routing.H_DETECTED_AT)),
        source=source, type=event_type, entity=entity, event_id=event_id,
        recheck_of=_text(by_name.get(H_RECHECK_OF)) or None,
    )


def replay_headers(record: QuarantinedRecord, approval: DecisionEntry, *, now: float) -> Headers:
    """The producer's headers plus the replay marks; byzguard's headers are replaced, never appended."""
    out = record.producer_headers()
    out.extend([
        (routing.H_VERDICT, VERDICT_APPROVED),
        (routing.H_ROUTE, record.route.encode()),
        (routing.H_REASONS, orjson.dumps(list(record.reasons))),
        (H_REPLAYED, b"1"),
        (routing.H_QUARANTINE_ID, record.quarantine_id.encode()),
        (H_REVIEWER, approval.reviewer.encode()),
        (H_DECIDED_AT, f"{approval.at:.6f}".encode()),
        (H_REPLAYED_AT, f"{now:.6f}".encode()),
    ])
    return out


def recheck_headers(record: QuarantinedRecord) -> Headers:
    """The producer's headers plus which quarantine record this re-sent copy comes from."""
    out = record.producer_headers()
    out.append((H_RECHECK_OF, record.quarantine_id.encode()))
    return out


# --------------------------------------------------------------------------- the derived state


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """A quarantined record with its decision history, status and recheck links."""

    record: QuarantinedRecord
    decision: DecisionRecord | None
    status: Status
    recheck_of: str | None
    rechecked_as: str | None


class ReviewLedger:
    """The current review state: quarantine records plus the latest decision of each, fed in any order."""

    def __init__(self) -> None:
        self.records: dict[str, QuarantinedRecord] = {}
        self.decisions: dict[str, DecisionRecord] = {}
        self.unreadable_decisions = 0
        self._rechecked_from: dict[str, str] = {}

    def add_record(self, record: QuarantinedRecord) -> None:
        """Add a record read from a quarantine topic (a redelivered copy keeps its id and replaces it)."""
        self.records[record.quarantine_id] = record

    def add_decision(self, key: bytes | None, value: bytes | None) -> DecisionRecord | None:
        """Apply a decisions-topic record; an older history than the one held is ignored."""
        if key is None:
            return None
        qid = key.decode("utf-8", "replace")
        if value is None:  # a tombstone: the decision was deleted on purpose
            self.decisions.pop(qid, None)
            return None
        try:
            decision = DecisionRecord.from_bytes(value)
        except (ValueError, KeyError, TypeError):
            self.unreadable_decisions += 1
            return None
        held = self.decisions.get(qid)
        if held is not None and len(held.history) > len(decision.history):
            return held
        self.decisions[qid] = decision
        recheck = decision.last(Action.RECHECK)
        if recheck is not None and recheck.target:
            self._rechecked_from[recheck.target] = qid
        return decision

    def status(self, qid: str) -> Status:
        """The status of one quarantine id (pending when nothing was decided)."""
        return status_of(self.decisions.get(qid))

    def item(self, qid: str) -> ReviewItem | None:
        """Everything known about one quarantine id, or None when no such record was read."""
        record = self.records.get(qid)
        return self.review_item(record) if record is not None else None

    def review_item(self, record: QuarantinedRecord) -> ReviewItem:
        """A record with what the decisions held say about it (the record itself is not kept)."""
        decision = self.decisions.get(record.quarantine_id)
        recheck = decision.last(Action.RECHECK) if decision is not None else None
        return ReviewItem(record, decision, status_of(decision),
                          recheck_of=record.recheck_of or self._rechecked_from.get(record.quarantine_id),
                          rechecked_as=recheck.target if recheck is not None and recheck.target else None)

    def items(self, selected: ReviewFilter | None = None) -> list[ReviewItem]:
        """Matching items, newest first."""
        found = [item for qid in self.records if (item := self.item(qid)) is not None]
        if selected is not None:
            found = [i for i in found if selected.matches(i)]
        found.sort(key=lambda i: (i.record.time or 0.0, i.record.quarantine_id), reverse=True)
        return found


def counts(items: Sequence[ReviewItem]) -> dict[str, dict[str, int]]:
    """How many items per reason code, per status, per route, per source and per type."""
    by_reason: Counter[str] = Counter(code for i in items for code in set(i.record.codes))
    return {
        "reason": dict(by_reason.most_common()),
        "status": dict(Counter(i.status.value for i in items).most_common()),
        "route": dict(Counter(i.record.route for i in items).most_common()),
        "source": dict(Counter(i.record.source for i in items).most_common()),
        "type": dict(Counter(i.record.type for i in items).most_common()),
    }


MAX_COUNTED = 100  # distinct values counted per field; the rest are counted together as OTHER
OTHER = "(other)"


class Tally:
    """counts() over a stream of items, in bounded memory: at most MAX_COUNTED distinct values per field."""

    FIELDS = ("reason", "status", "route", "source", "type")

    def __init__(self) -> None:
        self.by: dict[str, Counter[str]] = {name: Counter() for name in self.FIELDS}

    def _add(self, name: str, value: str) -> None:
        counter = self.by[name]
        if value not in counter and len(counter) >= MAX_COUNTED:
            value = OTHER
        counter[bounded(value, text=200)] += 1

    def add(self, item: ReviewItem) -> None:
        """Count one item."""
        rec = item.record
        for code in set(rec.codes):
            self._add("reason", code)
        self._add("status", item.status.value)
        self._add("route", rec.route)
        self._add("source", rec.source)
        self._add("type", rec.type)

    def as_dict(self) -> dict[str, dict[str, int]]:
        """The same shape as counts()."""
        return {name: dict(counter.most_common()) for name, counter in self.by.items()}


# --------------------------------------------------------------------------- filters


def parse_when(raw: str) -> float:
    """Epoch seconds or an ISO-8601 / RFC 3339 time (UTC when no zone is given) -> epoch seconds."""
    text = raw.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadFilterError(f"{raw!r} is not a time (epoch seconds or ISO-8601)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@dataclass(frozen=True, slots=True)
class ReviewFilter:
    """Which quarantined records to show or act on; unset fields match everything."""

    route: str | None = None
    status: frozenset[Status] | None = None
    reason: str | None = None  # a code (version.regression) or a family (version)
    source: str | None = None
    type: str | None = None
    entity: str | None = None
    since: float | None = None
    until: float | None = None
    ids: frozenset[str] | None = field(default=None)

    FIELDS = ("route", "status", "reason", "source", "type", "entity", "since", "until")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, str | None]) -> ReviewFilter:
        """Build from query parameters or CLI options; empty values are unset. BadFilterError when wrong."""
        values = {k: (v.strip() if isinstance(v, str) else v) for k, v in raw.items() if k in cls.FIELDS}
        values = {k: v for k, v in values.items() if v}
        statuses = None
        if "status" in values:
            try:
                statuses = frozenset(Status(s.strip()) for s in str(values["status"]).split(",") if s.strip())
            except ValueError:
                raise BadFilterError(f"unknown status in {values['status']!r}; "
                                     f"known: {', '.join(s.value for s in Status)}") from None
        ids = raw.get("ids")
        return cls(
            route=values.get("route"), status=statuses, reason=values.get("reason"),
            source=values.get("source"), type=values.get("type"), entity=values.get("entity"),
            since=parse_when(str(values["since"])) if "since" in values else None,
            until=parse_when(str(values["until"])) if "until" in values else None,
            ids=frozenset(i.strip() for i in ids.split(",") if i.strip()) if ids else None,
        )

    def matches(self, item: ReviewItem) -> bool:
        """Whether an item passes every set field."""
        rec = item.record
        when = rec.time
        return (
            (self.ids is None or rec.quarantine_id in self.ids)
            and (self.route is None or rec.route == self.route)
            and (self.status is None or item.status in self.status)
            and (self.reason is None or any(c == self.reason or c.split(".", 1)[0] == self.reason
                                            for c in rec.codes))
            and (self.source is None or rec.source == self.source)
            and (self.type is None or rec.type == self.type)
            and (self.entity is None or rec.entity == self.entity)
            and (self.since is None or (when is not None and when >= self.since))
            and (self.until is None or (when is not None and when < self.until))
        )

    def as_dict(self) -> dict[str, Any]:
        """The set fields, JSON-ready (for reports of bulk actions)."""
        out: dict[str, Any] = {}
        for name in (*self.FIELDS, "ids"):
            value = getattr(self, name)
            if value is not None:
                out[name] = sorted(str(v) for v in value) if isinstance(value, frozenset) else value
        return out


# --------------------------------------------------------------------------- authentication


def clean_reviewer(raw: str | None) -> str:
    """A reviewer name fit to record: printable, trimmed, at most MAX_REVIEWER characters; '' when none."""
    if not raw:
        return ""
    return "".join(ch for ch in raw.strip() if ch.isprintable())[:MAX_REVIEWER]


def clean_note(raw: object) -> str:
    """A decision note fit to record (text, at most MAX_NOTE characters)."""
    return str(raw or "")[:MAX_NOTE]


def parse_token_map(raw: str | None) -> dict[str, str]:
    """'alice:token1,bob:token2' -> {token: reviewer}; ValueError on an entry without both parts."""
    out: dict[str, str] = {}
    for part in (raw or "").split(","):
        if not part.strip():
            continue
        name, sep, token = part.strip().partition(":")
        if not sep or not name.strip() or not token.strip():
            raise ValueError("review tokens must read 'name:token,name:token'")
        out[token.strip()] = clean_reviewer(name)
    return out


def credentials(authorization: str | None) -> tuple[str | None, str | None]:
    """(username or None, token or None) from an Authorization header: Bearer <token> or Basic user:token."""
    if not authorization:
        return None, None
    scheme, _, rest = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and rest.strip():
        return None, rest.strip()
    if scheme == "basic" and rest.strip():
        try:
            user, sep, token = base64.b64decode(rest.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        return (user or None, token or None) if sep else (None, None)
    return None, None


def authenticate(authorization: str | None, *, claimed_reviewer: str | None, shared_token: str | None,
                 named_tokens: Mapping[str, str], require_name: bool = True) -> str:
    """The reviewer a request acts as, or NotAuthenticatedError.

    A named token proves its reviewer. The shared token proves membership only: the reviewer names
    themselves (X-Byzguard-Reviewer or the Basic user name), and that name is recorded as given. Reads
    (require_name=False) need a valid token but no name; they return '' for a nameless shared token.
    """
    if not shared_token and not named_tokens:
        raise NotAuthenticatedError("review actions are disabled: no BYZGUARD_REVIEW_TOKEN or "
                                    "BYZGUARD_REVIEW_TOKENS is configured for this deployment")
    user, token = credentials(authorization)
    if token is None:
        raise NotAuthenticatedError("send 'Authorization: Bearer <token>' (or Basic reviewer:token)")
    for known, reviewer in named_tokens.items():
        if hmac.compare_digest(known.encode(), token.encode()):
            return reviewer
    if shared_token and hmac.compare_digest(shared_token.encode(), token.encode()):
        name = clean_reviewer(claimed_reviewer) or clean_reviewer(user)
        if not name and require_name:
            raise NotAuthenticatedError("with the shared review token, name yourself: X-Byzguard-Reviewer header "
                                        "or the Basic user name")
        return name
    raise NotAuthenticatedError("invalid review token")


# --------------------------------------------------------------------------- presentation


# What review shows of one record is bounded: a record's bytes are whatever a producer (or an attacker) sent, and
# every view (page, API, CLI) must render it. Deeper levels, longer containers and longer strings are cut with a
# marker that says so; the bytes in the topic are untouched, and replay delivers them whole.
MAX_DEPTH = 32
MAX_ITEMS = 200
MAX_TEXT = 4000
MAX_NODES = 20_000  # values in all: what one detail view shows at most
CUT = "\u2026"  # the marker's first character: an ellipsis


def bounded(value: Any, *, depth: int = MAX_DEPTH, items: int = MAX_ITEMS, text: int = MAX_TEXT,
            nodes: int = MAX_NODES) -> Any:
    """A JSON value cut to fit any view: containers below `depth` levels, beyond `items` entries or past `nodes`
    values in all, and strings beyond `text` characters are replaced or shortened, with a marker saying what was
    left out."""
    budget = [nodes]

    def cut(value: Any, depth: int) -> Any:
        budget[0] -= 1
        if isinstance(value, str):
            return value if len(value) <= text else f"{value[:text]}{CUT}({len(value) - text} more characters)"
        if not isinstance(value, (dict, list, tuple)):
            return value
        kind = f"an object of {len(value)} entries" if isinstance(value, dict) else f"a list of {len(value)} items"
        if depth <= 0:
            return f"{CUT}({kind} nested deeper than {MAX_DEPTH} levels)"
        if budget[0] <= 0:
            return f"{CUT}({kind} left out: the record is too large to show whole)"
        if isinstance(value, dict):
            out = {}
            for k, v in list(value.items())[:items]:
                out[cut(str(k), 0)] = cut(v, depth - 1)
            if len(value) > items:
                out[CUT] = f"({len(value) - items} more entries)"
            return out
        shown = [cut(v, depth - 1) for v in value[:items]]
        if len(value) > items:
            shown.append(f"{CUT}({len(value) - items} more items)")
        return shown

    return cut(value, depth)


def _header_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode()


def _time_text(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds") if epoch is not None else None


def item_summary(item: ReviewItem, *, text: int = MAX_TEXT) -> dict[str, Any]:
    """The JSON form of an item in a list (strings cut at `text` characters)."""
    rec = item.record
    latest = item.decision.latest if item.decision is not None else None
    summary: dict[str, Any] = bounded({
        "quarantine_id": rec.quarantine_id, "route": rec.route, "status": item.status.value,
        "codes": list(rec.codes), "source": rec.source, "type": rec.type, "entity": rec.entity,
        "event_id": rec.event_id, "detected_at": rec.detected_at, "detected_at_iso": _time_text(rec.detected_at),
        "original": {"topic": rec.original_topic, "partition": rec.original_partition,
                     "offset": rec.original_offset, "timestamp": rec.original_timestamp},
        "last_decision": latest.as_dict() if latest is not None else None,
        "recheck_of": item.recheck_of, "rechecked_as": item.rechecked_as,
    }, text=text)
    return summary


def decoded_data(record: QuarantinedRecord, default_type: str = "") -> dict[str, Any]:
    """The record's envelope attributes and data as JSON values, or why it does not decode."""
    env = decode(record.key, record.value, record.producer_headers(), default_type=default_type)
    if isinstance(env, tuple):
        code, detail = env
        return {"decoded": False, "code": code.value, "detail": detail, "raw": _value_text(record.value)}
    data = env.data()
    return {"decoded": True, "mode": env.mode, "attributes": env.attributes(),
            "data": data if data is not None else _value_text(env.covered)}


def _value_text(raw: bytes | None) -> str | None:
    return _header_text(raw) if raw is not None else None


def item_detail(item: ReviewItem, default_type: str = "") -> dict[str, Any]:
    """The JSON form of one item: the summary plus decoded data, headers, reasons and history (bounded())."""
    rec = item.record
    detail: dict[str, Any] = bounded({
        **item_summary(item),
        "key": _value_text(rec.key),
        "reasons": [dict(r) for r in rec.reasons],
        "headers": [[k, _header_text(v)] for k, v in rec.headers],
        "quarantine": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
                       "timestamp": rec.timestamp},
        "data": decoded_data(rec, default_type),
        "history": [e.as_dict() for e in item.decision.history] if item.decision is not None else [],
    })
    return detail


def entity_view(raw: bytes | None) -> dict[str, Any] | None:
    """An entity state table value as JSON values (the last-known-good value beside a record), or None."""
    if not raw:
        return None
    state = EntityState.from_bytes(raw)
    data = state.last_good_data()
    view: dict[str, Any] = bounded({
        "version": state.version, "type": state.last_good_type, "verified_at": state.verified_at,
        "verified_at_iso": _time_text(state.verified_at), "event_time": state.event_time,
        "last_good": data if data is not None else _value_text(state.last_good)})
    return view
