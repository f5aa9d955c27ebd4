"""The verdict: one pure function from (event, policy, state) to where the event goes and the new state.

Every check of the catalogue runs here, in one pass, over one entity record and one per-source mark.
Agents call `verify` and only move bytes and state; producers and downstream consumers can call it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from hmac import compare_digest
from types import MappingProxyType
from typing import Any, Final

import orjson
from orjson import JSONDecodeError

from byzguard.clocks import Order
from byzguard.config import Policy, TypePolicy
from byzguard.envelope import Envelope
from byzguard.integrity import BOUND, DEFAULT_FORMS, HMAC_SHA256, KeyRing, check_integrity, hmac_sha256
from byzguard.state import _HEAD as _ENTRIES_HEAD
from byzguard.state import EntityState, bounded_merge, id_hash, new_entries
from byzguard.verdict import Code, Outcome, Reason, Severity, quote

# Failures that mean "we do not know who sent this or whether the bytes are the ones sent": checks that
# compare the event with state would only add noise, so they are skipped.
_UNTRUSTED = frozenset({
    Code.INTEGRITY_MISSING, Code.INTEGRITY_MISMATCH, Code.INTEGRITY_UNKNOWN_ALGORITHM,
    Code.INTEGRITY_UNKNOWN_KEY, Code.INTEGRITY_BAD_MAC, Code.INTEGRITY_UNBOUND, Code.INTEGRITY_NONCANONICAL,
    Code.INTEGRITY_LEGACY_FORM, Code.SOURCE_FORGED, Code.SOURCE_NOT_ALLOWED, Code.TYPE_UNLISTED,
})

# Enum members as module constants: on Python 3.11 `Severity.OFF` is a descriptor lookup that costs about as
# much as the comparison it feeds, and the per-event path makes a few dozen of them.
_OFF: Final = Severity.OFF
_WARN: Final = Severity.WARN
_REJECT: Final = Severity.REJECT
_VERIFIED: Final = Outcome.VERIFIED
_WARNED: Final = Outcome.WARNED
_SUSPECT: Final = Outcome.SUSPECT
_QUARANTINED: Final = Outcome.QUARANTINED
_DUPLICATE: Final = Outcome.DUPLICATE
#: The outcomes whose event goes to the verified topic (Decision.forward), and those recorded in quarantine
#: (Decision.quarantine).
FORWARDED: Final = (_VERIFIED, _WARNED, _SUSPECT)
RECORDED: Final = (_QUARANTINED, _SUSPECT)
_FORWARDED: Final = FORWARDED
_RECORDED: Final = RECORDED
_ID_DUPLICATE: Final = Code.ID_DUPLICATE
_INVARIANT_VIOLATED: Final = Code.INVARIANT_VIOLATED
_BEFORE: Final = Order.BEFORE
_AFTER: Final = Order.AFTER
_EQUAL: Final = Order.EQUAL
_CONCURRENT: Final = Order.CONCURRENT
_FAIL_OPEN: Final = Policy.FAIL_OPEN
# What rules that never read `event` are given instead of the envelope attributes (never looked at).
_NO_ATTRIBUTES: Final[Mapping[str, Any]] = MappingProxyType({})
_new: Final = object.__new__
_loads: Final = orjson.loads


# Not frozen: a frozen dataclass's __init__ costs about 1 µs more, and one or two are built per event.
# Treat it as immutable all the same.
@dataclass(slots=True)
class Decision:
    """Where one event goes and what it changes. `entity`/`lamport` are None when state is unchanged."""

    outcome: Outcome
    reasons: tuple[Reason, ...] = ()
    entity: EntityState | None = None
    lamport: int | None = None

    @property
    def forward(self) -> bool:
        """True when the event goes to the verified topic."""
        return self.outcome in _FORWARDED

    @property
    def quarantine(self) -> bool:
        """True when the event is recorded in the quarantine topic."""
        return self.outcome in _RECORDED


@dataclass(frozen=True, slots=True)
class Limits:
    """Idempotency bounds shared by every route."""

    ids_per_entity: int = 32
    id_window: float = 86_400.0
    #: A verified value larger than this is not kept as the last-known-good (state.last_good_too_large).
    last_good_max_bytes: int = 256 * 1024


def decode_failure(code: Code, detail: str) -> Decision:
    """A record that could not be decoded: always quarantined with its bytes, whatever the route's policy."""
    return Decision(Outcome.QUARANTINED, (Reason(code, detail, Severity.REJECT),))


class _Reasons:
    """Collects failures at the severity the policy gives their code; `off` codes vanish here."""

    __slots__ = ("items", "policy")

    def __init__(self, policy: TypePolicy) -> None:
        self.policy = policy
        self.items: list[Reason] = []

    def add(self, code: Code, detail: str, severity: Severity | None = None) -> None:
        level = self.policy.level(code)
        if level is _OFF:
            return
        if severity is not None and level is _WARN:
            severity = _WARN  # a check demoted to warn caps its rules' own severities
        self.items.append(Reason(code, detail, severity or level))

    def rejects(self) -> bool:
        return any(r.severity is _REJECT for r in self.items)


def verify(
    env: Envelope,
    policy: TypePolicy,
    entity: EntityState | None,
    lamport_mark: int | None,
    keyring: KeyRing,
    *,
    now: float,
    limits: Limits = Limits(),
    received: float | None = None,
    writer: str | None = None,
) -> Decision:
    """Run every check on `env` against the entity's and the source's state; return the decision.

    `received` is when the broker appended the record: clock skew is judged against it, so a worker that
    lags behind its input does not mistake an event from a clock that runs ahead for a punctual one.
    `writer` is the source the input topic declares as its only writer, if any.
    """
    decision = verify_clean(env, policy, entity, lamport_mark, keyring, now, limits, received, writer)
    if decision is not None:
        return decision
    return verify_checked(env, policy, entity, lamport_mark, keyring, now, limits, received, writer)


def verify_clean(env: Envelope, policy: TypePolicy, entity: EntityState | None, lamport_mark: int | None,
                 keyring: KeyRing, now: float, limits: Limits, received: float | None,
                 writer: str | None, digest: str | None = None) -> Decision | None:
    """The decision on an event no check objects to, in the fewest steps; None as soon as a check might add a
    reason, whatever its severity (`verify_checked` then runs every check and says which; after a failed
    integrity check or rule, verify_clean hands it their results itself). Each test is the negation
    of the condition under which `verify_checked` adds a reason or returns early, so both decide a clean event alike
    (tests/unit/test_clean_path.py holds them to it).

    `digest`: hmac_sha256 of env.bound by `keyring`'s key of the checksum's key id, when the caller computed it
    already (Guard.prepare); None: computed here if needed."""
    if not policy.listed or env.refused is not None or (writer is not None and env.source != writer):
        return None
    source = env.source
    sources = policy.sources
    if sources is not None and source not in sources:
        return None
    key_ids = policy.key_ids
    if key_ids is not None:
        checksum = env.checksum
        if checksum is None or checksum.algorithm != HMAC_SHA256 or checksum.key_id not in key_ids:
            return None
    accepted = policy.forms.get(source, DEFAULT_FORMS)
    checksum = env.checksum
    bound = env.bound
    if bound is not None and checksum is not None and checksum.algorithm == HMAC_SHA256 and env.form == BOUND \
            and BOUND in accepted:
        # check_integrity's common case (a MAC over the bound form that decode built, by the source's own key):
        # anything but a match is a failure there.
        key_id = checksum.key_id
        key = keyring.get(key_id) if key_id else None
        if key is None or key.source != source \
                or not compare_digest(hmac_sha256(key.secret, bound) if digest is None else digest,
                                      checksum.value.lower()):
            return None
    else:
        failures = check_integrity(env, accepted, keyring, required=policy.require_checksum)
        if failures:
            return verify_checked(env, policy, entity, lamport_mark, keyring, now, limits, received, writer,
                                  integrity=failures)
    severity = policy.severity
    if entity is not None:
        # EntityState.find's first test inline (the id's hash is not among the entries: a new id), then find.
        blob = entity.entries
        if blob and blob.find(id_hash(env.id), _ENTRIES_HEAD) >= 0 and severity.get(_ID_DUPLICATE, _REJECT) \
                is not _OFF and entity.find(env.id, now, limits.id_window) is not None:
            return None
        version = env.version
        last_version = entity.version
        if version is not None and last_version is not None and version != last_version + 1:
            return None
        vclock = env.vclock
        if vclock is not None and entity.vclock is not None and vclock.compare(entity.vclock) is not _AFTER:
            return None
    lamport = env.lamport
    if lamport is not None and lamport_mark is not None and lamport <= lamport_mark:
        return None
    time = env.time
    if time is not None:
        max_age = policy.max_age
        if max_age is not None and now - time > max_age:
            return None
        max_skew = policy.max_skew
        # min(received, now) without the builtin's call (the same answer, NaN included: min keeps its first
        # argument unless the second is smaller)
        if max_skew is not None and time - (now if received is None or now < received else received) > max_skew:
            return None
    rules = policy.rules
    plan = rules.plan  # (generated function, uses_last, uses_event): RuleSet.evaluate's first step, inline
    if plan is not None and severity.get(_INVARIANT_VIOLATED, _REJECT) is not _OFF:
        generated, uses_last, uses_event = plan
        last = None
        if entity is not None and uses_last:  # entity.last_good_data(), inline
            try:
                last = _loads(entity.last_good)
            except JSONDecodeError:
                last = None
        data = env.data()
        try:
            slow = generated(data, last, now, True) if generated is not None else None
        except Exception:
            slow = None
        # [] says every rule holds; otherwise the closures or celpy decide the rest, as evaluate would.
        if slow is None or slow:
            violations = rules.decide(slow, data, last, now=now, event=env.attributes() if uses_event
                                      else _NO_ATTRIBUTES)
            if violations:
                return verify_checked(env, policy, entity, lamport_mark, keyring, now, limits, received, writer,
                                      violations=violations)
    covered = env.covered
    if len(covered) > limits.last_good_max_bytes:
        return None
    # No reason: verified, the mark moves (lamport > lamport_mark here) and the state advances (_advance, inline:
    # the event's clock is after the entity's, so their bounded merge is the event's clock).
    version = env.version
    entries = b""
    last_version = None
    vclock = env.vclock
    if entity is not None:
        entries = entity.entries
        last_version = entity.version
        if last_version is not None and (version is None or last_version > version):
            version = last_version
        if vclock is None:
            vclock = entity.vclock
    content_hash = env.content_hash
    # new_entries positionally, and both objects built field by field (without their dataclass __init__ calls).
    state = _new(EntityState)
    state.version = version
    state.vclock = vclock
    state.content_hash = content_hash
    state.last_good = covered
    state.last_good_type = env.type
    state.verified_at = now
    state.event_time = env.time
    state.entries = new_entries(entries, env.id, content_hash, now, env.version, now, limits.id_window,
                                limits.ids_per_entity, last_version, version)
    state.last_good_dropped = 0
    decision = _new(Decision)
    decision.outcome = _VERIFIED
    decision.reasons = ()
    decision.entity = state
    decision.lamport = lamport
    return decision


def verify_checked(env: Envelope, policy: TypePolicy, entity: EntityState | None, lamport_mark: int | None,
                   keyring: KeyRing, now: float, limits: Limits, received: float | None, writer: str | None, *,
                   integrity: list[tuple[Code, str]] | None = None,
                   violations: list[Reason] | None = None) -> Decision:
    """Every check in turn, each failure a reason at its code's severity: the decision on any event.

    `integrity` and `violations` are check_integrity's and RuleSet.evaluate's results when verify_clean already
    has them (a failing event then costs no second diagnosis or rule evaluation)."""
    reasons = _Reasons(policy)
    _check_authorization(env, policy, reasons)
    if writer is not None and env.source != writer:
        reasons.add(Code.SOURCE_NOT_ALLOWED, f"the input topic is declared as written by source {writer!r}, "
                    f"the event claims source {quote(env.source)}")
    if integrity is None:
        integrity = check_integrity(env, policy.forms.get(env.source, DEFAULT_FORMS), keyring,
                                    required=policy.require_checksum)
    for code, detail in integrity:
        reasons.add(code, detail)
    if reasons.items and any(r.code in _UNTRUSTED and r.severity is _REJECT for r in reasons.items):
        return _conclude(env, policy, reasons, None, None, now, limits, update=False)
    if env.refused is not None:  # declared JSON that is not JSON, or not unambiguous: whatever the policy
        code, detail = env.refused
        return Decision(_QUARANTINED, (*reasons.items, Reason(code, detail, _REJECT)))

    severity = policy.severity
    if entity is not None:
        duplicates = severity.get(_ID_DUPLICATE, _REJECT) is not _OFF
        if duplicates:
            seen = entity.find(env.id, now, limits.id_window)
            if seen is not None:
                if not seen.same_content(env.content_hash):
                    reasons.add(Code.ID_REUSED, f"event id {quote(env.id)} was already used for different content")
                elif seen.version is None or seen.version == env.version:  # a re-send
                    return Decision(_DUPLICATE, (Reason(_ID_DUPLICATE,
                                    f"event id {quote(env.id)} was already verified with the same content",
                                    _WARN),))
                else:  # the same data again under another version: a new event with an old id, not a re-send
                    this = "an event without a version" if env.version is None else f"version {env.version}"
                    reasons.add(Code.ID_REUSED, f"event id {quote(env.id)} was already used for version "
                                f"{seen.version}; this is {this} with the same content")
        if env.version is not None and entity.version is not None:
            if env.version == entity.version and env.content_hash == entity.content_hash and duplicates:
                return Decision(_DUPLICATE, (Reason(_ID_DUPLICATE,
                                f"version {env.version} re-sent with identical content under id {quote(env.id)}",
                                _WARN),))
            if env.version != entity.version + 1:  # the next version adds no reason (_check_version)
                _check_version(env.version, entity, env, reasons)
        if env.vclock is not None and entity.vclock is not None \
                and env.vclock.compare(entity.vclock) is not _AFTER:  # a clock after the entity's adds none
            _check_vclock(env, entity, reasons)
    if env.lamport is not None and lamport_mark is not None and env.lamport <= lamport_mark:
        writer = f"source {quote(env.source)}" if env.instance is None else \
            f"source {quote(env.source)} (instance {quote(env.instance)})"
        reasons.add(Code.LAMPORT_REGRESSION, f"{writer} sent Lamport time {env.lamport} after {lamport_mark}")
    if env.time is not None and (policy.max_age is not None or policy.max_skew is not None):
        _check_time(env, policy, now, now if received is None else min(received, now), reasons)
    rules = policy.rules
    if rules and severity.get(_INVARIANT_VIOLATED, _REJECT) is not _OFF:
        if violations is None:
            last = entity.last_good_data() if entity is not None and rules.uses_last else None
            # The attributes are built only for rules that read (or quote) `event`.
            event = env.attributes() if rules.uses_event else _NO_ATTRIBUTES
            # Both were parsed by orjson (Envelope.data, EntityState.last_good_data): the rules rely on it.
            violations = rules.evaluate(env.data(), last, now=now, event=event, from_orjson=True)
        for reason in violations:
            reasons.add(reason.code, reason.detail, reason.severity)
    return _conclude(env, policy, reasons, entity, lamport_mark, now, limits, update=True)


def _check_authorization(env: Envelope, policy: TypePolicy, reasons: _Reasons) -> None:
    if not policy.listed:  # the route's types are an allow-list
        reasons.add(Code.TYPE_UNLISTED, f"type {quote(env.type)} is not one of the route's types")
    if policy.sources is not None and env.source not in policy.sources:
        reasons.add(Code.SOURCE_NOT_ALLOWED, f"source {quote(env.source)} may not emit {quote(env.type)} "
                    f"(allowed: {sorted(policy.sources)})")
    if policy.key_ids is not None:
        checksum = env.checksum
        if checksum is None or checksum.algorithm != HMAC_SHA256:
            reasons.add(Code.INTEGRITY_MISSING, f"type {quote(env.type)} must be signed with hmac-sha256")
        elif checksum.key_id not in policy.key_ids:
            signer = "a MAC without a key id" if checksum.key_id is None else f"key {quote(checksum.key_id)}"
            reasons.add(Code.SOURCE_NOT_ALLOWED,
                        f"{signer} may not sign {quote(env.type)} (allowed: {sorted(policy.key_ids)})")


def _check_version(version: int, entity: EntityState, env: Envelope, reasons: _Reasons) -> None:
    last = entity.version
    assert last is not None
    if version < last:
        reasons.add(Code.VERSION_REGRESSION, f"version {version} is older than the verified version {last}")
    elif version == last:
        reasons.add(Code.VERSION_CONFLICT, f"version {version} was already verified with different content")
    elif version > last + 1:
        reasons.add(Code.VERSION_GAP, f"version {version} skips {version - last - 1} version(s) after {last}")


def _check_vclock(env: Envelope, entity: EntityState, reasons: _Reasons) -> None:
    assert env.vclock is not None and entity.vclock is not None
    order = env.vclock.compare(entity.vclock)
    if order is _BEFORE or order is _EQUAL:
        reasons.add(Code.VCLOCK_STALE, f"vector clock {env.vclock.to_header().decode()} is not after the "
                    f"verified {entity.vclock.to_header().decode()} (stale read)")
    elif order is _CONCURRENT:
        reasons.add(Code.VCLOCK_CONCURRENT, f"vector clock {env.vclock.to_header().decode()} is concurrent "
                    f"with the verified {entity.vclock.to_header().decode()} (conflicting writers)")


def _check_time(env: Envelope, policy: TypePolicy, now: float, received: float, reasons: _Reasons) -> None:
    if env.time is None:
        return
    # Staleness is about the data when it is used (now); skew about the producer's clock when it sent.
    age = now - env.time
    if policy.max_age is not None and age > policy.max_age:
        reasons.add(Code.TIME_STALE, f"event time is {age:.1f}s old, the type allows {policy.max_age:g}s")
    ahead = env.time - received
    if policy.max_skew is not None and ahead > policy.max_skew:
        reasons.add(Code.TIME_FUTURE, f"event time is {ahead:.1f}s ahead of its arrival at the broker, the skew "
                    f"tolerance is {policy.max_skew:g}s")


def _conclude(
    env: Envelope,
    policy: TypePolicy,
    reasons: _Reasons,
    entity: EntityState | None,
    lamport_mark: int | None,
    now: float,
    limits: Limits,
    *,
    update: bool,
) -> Decision:
    found = tuple(reasons.items)
    if found and reasons.rejects():
        outcome = _SUSPECT if policy.policy is _FAIL_OPEN else _QUARANTINED
        return Decision(outcome, found)
    outcome = _WARNED if found else _VERIFIED
    if not update:
        return Decision(outcome, found)
    # A warned value keeps the last-known-good it would replace, unless its type says otherwise. A version gap
    # questions neither the value nor who wrote it (versions were skipped, e.g. written where the guard is not).
    keep_last_good = bool(found) and entity is not None and bool(entity.last_good) \
        and not policy.warned_replaces_last_good and any(r.code is not Code.VERSION_GAP for r in found)
    if not keep_last_good and len(env.covered) > limits.last_good_max_bytes:
        reasons.add(Code.STATE_LAST_GOOD_TOO_LARGE,
                    f"the value ({len(env.covered)} bytes) is larger than last_good_max_bytes "
                    f"({limits.last_good_max_bytes}): it is forwarded but not kept as the last-known-good")
        found = tuple(reasons.items)
        if found and reasons.rejects():  # only where the code was set to reject
            return Decision(_SUSPECT if policy.policy is _FAIL_OPEN else _QUARANTINED, found)
        outcome = _WARNED if found else _VERIFIED
    return Decision(outcome, found, _advance(env, entity, now, limits, keep_last_good),
                    env.lamport if env.lamport is not None and (lamport_mark is None or env.lamport > lamport_mark)
                    else None)


def _advance(env: Envelope, entity: EntityState | None, now: float, limits: Limits,
             keep_last_good: bool = False) -> EntityState:
    """The entity's state after `env` is verified: only verified events ever reach here."""
    version = env.version
    vclock = env.vclock
    entries = b""
    if entity is not None:
        entries = entity.entries
        if entity.version is not None and (version is None or entity.version > version):
            version = entity.version
        vclock = bounded_merge(vclock, entity.vclock)
    entries = new_entries(entries, env.id, env.content_hash, now, env.version, now=now, window=limits.id_window,
                          keep=limits.ids_per_entity, old_version=entity.version if entity is not None else None,
                          new_version=version)
    # Positional: a dataclass keyword call is measurably slower on this per-event path.
    # (version, vclock, content_hash, last_good, last_good_type, verified_at, event_time, entries, dropped)
    if keep_last_good:
        assert entity is not None
        return EntityState(version, vclock, env.content_hash, entity.last_good, entity.last_good_type,
                           entity.verified_at, entity.event_time, entries)
    covered = env.covered
    if len(covered) > limits.last_good_max_bytes:
        return EntityState(version, vclock, env.content_hash, b"", env.type, now, env.time, entries, len(covered))
    return EntityState(version, vclock, env.content_hash, covered, env.type, now, env.time, entries)
