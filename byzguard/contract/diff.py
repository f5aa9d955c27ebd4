"""Configuration diffs: what a NEW configuration would newly reject or warn about, against OLD, on one sample.

Both configurations check the same records, in the same order, at the same `now`, each over its own
state (a stricter NEW keeps fewer events out of state, exactly as the live guard would). Events are then
compared one by one:

- `newly_rejected`: passed (or only warned) under OLD, rejected under NEW: the change would quarantine them;
- `newly_warned`: verified cleanly under OLD, forwarded with warnings under NEW;
- `no_longer_rejected` / `no_longer_warned`: the reverse (the change relaxes the route);
- `codes_changed`: the same outcome for other reasons (e.g. a second rule now fails too);
- `outcome_changed`: any other move (to or from a duplicate).

Reasons are compared by (code, severity); `added` carries NEW's details, `removed` OLD's.
"""

from __future__ import annotations

import time as _time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from byzguard.guard import RecordIn
from byzguard.verdict import Outcome, Reason

from .check import Clock, Contract, ContractReport, Finding, Snapshot
from .sample import as_records

__all__ = ["Change", "ContractDiff", "diff_contracts"]

KINDS = ("newly_rejected", "newly_warned", "codes_changed", "outcome_changed", "no_longer_rejected",
         "no_longer_warned")


@dataclass(frozen=True, slots=True)
class Change:
    """One event treated differently by NEW than by OLD."""

    index: int
    where: str
    key: str | None
    event_type: str | None
    kind: str
    old_outcome: Outcome
    new_outcome: Outcome
    added: tuple[Reason, ...]
    removed: tuple[Reason, ...]

    def describe(self) -> str:
        """One title line, then `+ code: detail` for reasons NEW adds and `- code: detail` for ones it drops."""
        key = f" key={self.key!r}" if self.key is not None else ""
        kind = f" type={self.event_type}" if self.event_type else ""
        lines = [f"{self.where}{key}{kind}: {self.kind}: {self.old_outcome.value} -> {self.new_outcome.value}"]
        lines.extend(f"    + {r.code.value} ({r.severity.value}): {r.detail}" for r in self.added)
        lines.extend(f"    - {r.code.value} ({r.severity.value}): {r.detail}" for r in self.removed)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"index": self.index, "where": self.where, "key": self.key, "type": self.event_type,
                "kind": self.kind, "old": self.old_outcome.value, "new": self.new_outcome.value,
                "added": [r.as_dict() for r in self.added], "removed": [r.as_dict() for r in self.removed]}


@dataclass(frozen=True)
class ContractDiff:
    """Every event whose treatment changes from OLD to NEW, with both full reports."""

    route: str
    total: int
    changes: tuple[Change, ...]
    old: ContractReport
    new: ContractReport

    def of_kind(self, kind: str) -> tuple[Change, ...]:
        """The changes of one kind (see KINDS)."""
        return tuple(c for c in self.changes if c.kind == kind)

    @property
    def newly_rejected(self) -> tuple[Change, ...]:
        """Events NEW would quarantine that OLD let through."""
        return self.of_kind("newly_rejected")

    @property
    def newly_warned(self) -> tuple[Change, ...]:
        """Events NEW would warn about that OLD verified cleanly."""
        return self.of_kind("newly_warned")

    @property
    def breaking(self) -> bool:
        """True when NEW rejects an event OLD did not."""
        return bool(self.newly_rejected)

    def summary(self) -> str:
        """One line: counts of each kind of change."""
        counts = ", ".join(f"{len(self.of_kind(k))} {k.replace('_', ' ')}" for k in KINDS if self.of_kind(k))
        return f"route {self.route!r}: {self.total} event(s): " + (counts or "no change")

    def format(self, *, limit: int | None = None) -> str:
        """The summary, then each change (newly rejected first)."""
        ordered = sorted(self.changes, key=lambda c: (KINDS.index(c.kind), c.index))
        lines = [self.summary()]
        lines.extend("  " + c.describe().replace("\n", "\n  ") for c in ordered[:limit])
        if limit is not None and len(ordered) > limit:
            lines.append(f"  ... and {len(ordered) - limit} more")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"route": self.route, "total": self.total, "breaking": self.breaking,
                "changes": [c.as_dict() for c in self.changes]}


def diff_contracts(
    old: Contract,
    new: Contract,
    records: Iterable[object],
    *,
    snapshot: Snapshot | None = None,
    now: Clock = None,
    labels: Sequence[str] | None = None,
    partitioned: bool = False,
) -> ContractDiff:
    """Check `records` under OLD and NEW and list the events whose treatment differs."""
    items: list[RecordIn] = as_records(records, topic=new.route.inputs[0])
    clock: Clock = _time.time() if now is None else now  # one `now` for both runs
    before = old.check(items, snapshot=snapshot, now=clock, labels=labels, partitioned=partitioned)
    after = new.check(items, snapshot=snapshot, now=clock, labels=labels, partitioned=partitioned)
    old_by = {f.index: f for f in before.findings}
    new_by = {f.index: f for f in after.findings}
    changes: list[Change] = []
    for index in sorted(old_by.keys() | new_by.keys()):
        change = _compare(index, old_by.get(index), new_by.get(index),
                          labels[index] if labels is not None and index < len(labels) else f"#{index}")
        if change is not None:
            changes.append(change)
    return ContractDiff(new.route.name, after.total, tuple(changes), before, after)


def _compare(index: int, old: Finding | None, new: Finding | None, where: str) -> Change | None:
    old_outcome = old.outcome if old is not None else Outcome.VERIFIED
    new_outcome = new.outcome if new is not None else Outcome.VERIFIED
    old_reasons = old.reasons if old is not None else ()
    new_reasons = new.reasons if new is not None else ()
    old_keys = {(r.code, r.severity) for r in old_reasons}
    new_keys = {(r.code, r.severity) for r in new_reasons}
    added = tuple(r for r in new_reasons if (r.code, r.severity) not in old_keys)
    removed = tuple(r for r in old_reasons if (r.code, r.severity) not in new_keys)
    old_rejected = old is not None and old.rejected
    new_rejected = new is not None and new.rejected
    if new_rejected and not old_rejected:
        kind = "newly_rejected"
    elif old_rejected and not new_rejected:
        kind = "no_longer_rejected"
    elif old_outcome is Outcome.VERIFIED and new_outcome is Outcome.WARNED:
        kind = "newly_warned"
    elif old_outcome is Outcome.WARNED and new_outcome is Outcome.VERIFIED:
        kind = "no_longer_warned"
    elif old_outcome is not new_outcome:
        kind = "outcome_changed"
    elif added or removed:
        kind = "codes_changed"
    else:
        return None
    ref = new if new is not None else old
    assert ref is not None
    return Change(index, where, ref.key, ref.event_type, kind, old_outcome, new_outcome, added, removed)
