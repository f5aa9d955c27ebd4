"""Verify again, downstream: re-check a verified record's checksum or MAC end to end with your own key ring.

byzguard forwards the producer's key, value bytes and headers untouched and only adds `byzguard_*`
headers, so a consumer of the verified topic can prove, without trusting the guard or anything in between,
that the bytes it got are the ones the producer stamped (and, with a MAC, that the producer wrote them):

    from byzguard.integrity import Key, KeyRing
    from byzguard.verify_again import verify_again

    ring = KeyRing({"pricing-1": Key("pricing-1", "pricing", secret)})
    result = verify_again(msg.key, msg.value, msg.headers, ring)
    if not result.ok:
        log.error("refusing %s: %s", msg.key, result.describe())

The `byzguard_*` headers are ignored (the check covers the producer's record only); the guard's verdict
is reported as `verdict` for consumers that also want to refuse `suspect` records of fail-open routes.

Records in the bound integrity form are checked with their attributes (ENVELOPE.md); a record whose type
came from its route's `default_type` needs that type (`default_type=`). Sources not yet moved to the bound
form are refused unless `forms={"pricing": {"value-only"}}` accepts their form; such a record is `ok`
with an `integrity.legacy_form` warning among its reasons.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from byzguard.envelope import decode
from byzguard.integrity import DEFAULT_FORMS, KeyRing, check_integrity
from byzguard.routing import H_VERDICT, original_headers
from byzguard.verdict import Code, Reason, Severity, quote

__all__ = ["Reverified", "verify_again", "verify_record"]

# decode needs a type for seed-shaped records without one; integrity does not depend on it.
_ANY_TYPE = "(any)"


@dataclass(frozen=True, slots=True)
class Reverified:
    """The outcome: ok, or the decode, integrity and authorship reasons it is not (and any warnings)."""

    reasons: tuple[Reason, ...] = ()
    verdict: str | None = None
    source: str | None = None
    key_id: str | None = None

    @property
    def ok(self) -> bool:
        """True when the checksum or MAC matches the producer's record (possibly with warnings)."""
        return all(r.severity is not Severity.REJECT for r in self.reasons)

    @property
    def codes(self) -> tuple[str, ...]:
        """The reason codes."""
        return tuple(r.code.value for r in self.reasons)

    def __bool__(self) -> bool:
        return self.ok

    def describe(self) -> str:
        """`ok`, or each reason as `code: detail`, separated by `; ` (after `ok: ` when they are warnings)."""
        said = "; ".join(f"{r.code.value}: {r.detail}" for r in self.reasons)
        if not self.ok:
            return said
        return f"ok: {said}" if said else "ok"


def verify_again(
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes]] | None,
    keyring: KeyRing,
    *,
    require_checksum: bool = True,
    sources: Collection[str] | None = None,
    forms: Mapping[str, Collection[str]] | None = None,
    default_type: str = _ANY_TYPE,
    default_source: str | None = None,
) -> Reverified:
    """Re-check the producer's checksum or MAC of one record from a verified topic.

    `require_checksum` (default True) makes a record without one fail with `integrity.missing`;
    `sources`, when given, also refuses records claiming any other source (`source.not_allowed`);
    `forms` maps a source to the integrity forms accepted from it besides `bound`; `default_type` and
    `default_source` are the route's `default_type` and the input topic's declared source, if any.
    """
    all_headers = list(headers or ())
    verdict_raw = next((v for k, v in reversed(all_headers) if k == H_VERDICT), None)
    verdict = verdict_raw.decode("utf-8", "replace") if verdict_raw is not None else None
    decoded = decode(key, value, original_headers(all_headers), default_type=default_type,
                     default_source=default_source)
    if isinstance(decoded, tuple):
        code, detail = decoded
        return Reverified((Reason(code, detail, Severity.REJECT),), verdict)
    env = decoded
    accepted = DEFAULT_FORMS | frozenset((forms or {}).get(env.source, ()))
    reasons = [Reason(code, detail, Severity.WARN if code is Code.INTEGRITY_LEGACY_FORM else Severity.REJECT)
               for code, detail in check_integrity(env, accepted, keyring, required=require_checksum)]
    if sources is not None and env.source not in sources:
        reasons.append(Reason(Code.SOURCE_NOT_ALLOWED,
                              f"source {quote(env.source)} is not one of {sorted(sources)}", Severity.REJECT))
    key_id = env.checksum.key_id if env.checksum is not None else None
    return Reverified(tuple(reasons), verdict, env.source, key_id)


def verify_record(record: object, keyring: KeyRing, *, require_checksum: bool = True,
                  sources: Collection[str] | None = None, forms: Mapping[str, Collection[str]] | None = None,
                  default_type: str = _ANY_TYPE, default_source: str | None = None) -> Reverified:
    """`verify_again` on anything with `key`, `value` and `headers` (aiokafka's ConsumerRecord, ...)."""
    return verify_again(getattr(record, "key", None), getattr(record, "value", None),
                        getattr(record, "headers", None) or (), keyring,
                        require_checksum=require_checksum, sources=sources, forms=forms,
                        default_type=default_type, default_source=default_source)
