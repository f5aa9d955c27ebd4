"""Verdicts as data: every check returns reasons, never raises, so the quarantine record can carry them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# Enum's own __hash__ is Python code (hash(self._name_)), so every dict or set lookup keyed by a member runs
# a Python call: about 1,700 instructions for `policy.level(code)`, a dozen times per event. Members are
# singletons (pickling and copying return the member itself), so hashing by identity finds exactly the keys
# hashing by name found; a plain string still matches no member key, as before (tests/unit/test_hot_path.py).
_BY_IDENTITY = object.__hash__


class Severity(StrEnum):
    """What a failed check does to the event on its route."""

    __hash__ = _BY_IDENTITY

    REJECT = "reject"
    WARN = "warn"
    OFF = "off"


class Outcome(StrEnum):
    """Where an input record ends up: exactly one of these per record.

    SUSPECT is a fail-open route's rejected event: forwarded marked suspect, and recorded in quarantine.
    """

    __hash__ = _BY_IDENTITY

    VERIFIED = "verified"
    WARNED = "warned"
    QUARANTINED = "quarantined"
    SUSPECT = "suspect"
    DUPLICATE = "duplicate"
    HELD = "held"


class Code(StrEnum):
    """Stable reason codes: `<family>.<name>`. The family is the check that emits it."""

    __hash__ = _BY_IDENTITY

    DECODE_MALFORMED = "decode.malformed"
    DECODE_UNSUPPORTED = "decode.unsupported"
    DECODE_KEY_MISMATCH = "decode.key_mismatch"
    DECODE_WRONG_PARTITION = "decode.wrong_partition"
    DECODE_AMBIGUOUS = "decode.ambiguous"
    INTEGRITY_MISSING = "integrity.missing"
    INTEGRITY_MISMATCH = "integrity.mismatch"
    INTEGRITY_UNKNOWN_ALGORITHM = "integrity.unknown_algorithm"
    INTEGRITY_UNKNOWN_KEY = "integrity.unknown_key"
    INTEGRITY_BAD_MAC = "integrity.bad_mac"
    INTEGRITY_UNBOUND = "integrity.unbound"
    INTEGRITY_NONCANONICAL = "integrity.noncanonical"
    INTEGRITY_LEGACY_FORM = "integrity.legacy_form"
    SOURCE_NOT_ALLOWED = "source.not_allowed"
    SOURCE_FORGED = "source.forged"
    TYPE_UNLISTED = "type.unlisted"
    ID_DUPLICATE = "id.duplicate"
    ID_REUSED = "id.reused"
    VERSION_REGRESSION = "version.regression"
    VERSION_CONFLICT = "version.conflict"
    VERSION_GAP = "version.gap"
    LAMPORT_REGRESSION = "lamport.regression"
    VCLOCK_STALE = "vclock.stale"
    VCLOCK_CONCURRENT = "vclock.concurrent"
    CAUSAL_GAP = "causal.gap"
    CAUSAL_OVERFLOW = "causal.overflow"
    TIME_STALE = "time.stale"
    TIME_FUTURE = "time.future"
    INVARIANT_VIOLATED = "invariant.violated"
    INVARIANT_ERROR = "invariant.error"
    #: Not a check of the event: its copy does not fit the destination topic, so a bounded stub stands for it.
    OUTPUT_TOO_LARGE = "output.too_large"
    STATE_LAST_GOOD_TOO_LARGE = "state.last_good_too_large"

    @property
    def check(self) -> str:
        """The configuration name of the check that emits this code."""
        return CHECK_OF_FAMILY[self.value.split(".", 1)[0]]


# Family prefix of a code -> the check (configuration key) that emits it.
CHECK_OF_FAMILY: dict[str, str] = {
    "decode": "decode",
    "integrity": "integrity",
    "source": "authorization",
    "type": "authorization",
    "id": "idempotency",
    "version": "version",
    "lamport": "causal",
    "vclock": "causal",
    "causal": "causal",
    "time": "time",
    "invariant": "invariant",
    "output": "output",
    "state": "state",
}


#: Longest quotation of an event's input in a reason: an attribute of 100 KB is not copied into every header.
QUOTE_LIMIT = 200


def quote(value: object) -> str:
    """`value` as reasons quote input: its repr, cut to QUOTE_LIMIT characters with an ellipsis; `null` for None."""
    if value is None:
        return "null"  # input comes from JSON or headers: it never says Python's None
    if isinstance(value, (str, bytes)) and len(value) > QUOTE_LIMIT:
        value = value[:QUOTE_LIMIT]  # repr only what can be shown: a huge value is not copied whole first
    text = repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT - 1] + "…"


@dataclass(frozen=True, slots=True)
class Reason:
    """One failed check: the stable code, its severity on this route, and a human-readable detail."""

    code: Code
    detail: str
    severity: Severity = Severity.REJECT

    @property
    def check(self) -> str:
        """The check that produced this reason."""
        return self.code.check

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form, as written into quarantine and verdict headers."""
        return {"check": self.check, "code": self.code.value, "severity": self.severity.value,
                "detail": self.detail}
