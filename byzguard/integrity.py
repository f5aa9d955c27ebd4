"""Checksums and MACs, the integrity forms they are computed over, and the key ring that proves who wrote them.

An integrity form names the bytes a checksum or MAC covers. The `bound` form (ENVELOPE.md has it byte
for byte) covers the attributes the checks depend on together with the data, as an HTTP Message Signature
(RFC 9421) covers its components, so an attribute changed in transit or an event replayed under another
subject or version fails. The other forms cover the data only (`value-only`, the first release's form) or
serializations producers use instead of RFC 8785; a source must be declared to use one, and an event
accepted in one says so in a warning. `form_input` is the one function that computes a form's bytes.

A MAC proves authorship: a key id belongs to exactly one source, so a MAC made with another source's key
is a forgery (`source.forged`), never a pass.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import xxhash

from byzguard.errors import KeyRingError
from byzguard.jcs import CanonicalizationError, canonicalize, js_sorted, js_stringify
from byzguard.verdict import Code, quote

if TYPE_CHECKING:
    from byzguard.envelope import Envelope

SHA256 = "sha256"
XXH3_128 = "xxh3-128"
HMAC_SHA256 = "hmac-sha256"
ALGORITHMS = frozenset({SHA256, XXH3_128, HMAC_SHA256})

# HMAC-SHA256 keyed once per secret: each MAC copies the keyed states instead of hashing the key pads again.
# Bounded, since producers may sign with keys of their own; cleared when full (rebuilding one costs a MAC).
_KEYED: dict[bytes, Any] = {}
_KEYED_MAX = 64


class Checksum(NamedTuple):
    """What the producer stamped: algorithm, hex digest and, for MACs, the key id. (A tuple: decode builds one
    per event, and a tuple is built in one step where a frozen dataclass sets each field through a call.)"""

    algorithm: str
    value: str
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class Key:
    """A MAC key: the id producers name, the one source allowed to sign with it, and the secret."""

    key_id: str
    source: str
    secret: bytes = b""

    def __repr__(self) -> str:  # never print a secret
        return f"Key(key_id={self.key_id!r}, source={self.source!r})"


class KeyRing:
    """Key id -> Key. Secrets come from files or the environment, never from the main configuration."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, Key] | None = None) -> None:
        self._keys: dict[str, Key] = dict(keys or {})

    def get(self, key_id: str) -> Key | None:
        """The key with this id, or None."""
        return self._keys.get(key_id)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    @classmethod
    def load(
        cls,
        specs: Mapping[str, tuple[str, str | None, str | None]],
        environ: Mapping[str, str] | None = None,
    ) -> KeyRing:
        """Load keys from `{key_id: (source, secret_env, secret_file)}`; raise KeyRingError naming the gap."""
        env = os.environ if environ is None else environ
        keys: dict[str, Key] = {}
        for key_id, (source, secret_env, secret_file) in specs.items():
            if secret_env:
                raw = env.get(secret_env)
                if raw is None:
                    raise KeyRingError(f"key {key_id!r}: environment variable {secret_env} is not set")
                secret = raw.encode()
            elif secret_file:
                try:
                    secret = Path(secret_file).read_bytes().strip()
                except OSError as exc:
                    raise KeyRingError(f"key {key_id!r}: cannot read {secret_file}: {exc}") from exc
            else:
                raise KeyRingError(f"key {key_id!r}: give secret_env or secret_file")
            if not secret:
                raise KeyRingError(f"key {key_id!r}: the secret is empty")
            keys[key_id] = Key(key_id, source, secret)
        return cls(keys)


def digest(algorithm: str, content: bytes, key: Key | None = None) -> str:
    """Hex digest of `content` under `algorithm` (a MAC needs its key). Used by producers and the guard."""
    if algorithm == XXH3_128:
        return xxhash.xxh3_128_hexdigest(content)
    if algorithm == SHA256:
        return hashlib.sha256(content).hexdigest()
    if algorithm == HMAC_SHA256:
        if key is None:
            raise KeyRingError("hmac-sha256 needs a key")
        return _hmac_sha256(key.secret, content)
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def _hmac_sha256(secret: bytes, content: bytes) -> str:
    """hmac.new(secret, content, sha256).hexdigest(), from the two SHA-256 states keyed once per secret (RFC 2104:
    the inner hash over the key XOR ipad and the content, the outer over the key XOR opad and the inner digest).
    Two copies of plain hash states cost fewer steps than a copy of OpenSSL's HMAC state."""
    keyed = _KEYED.get(secret)
    if keyed is None:
        if len(_KEYED) >= _KEYED_MAX:
            _KEYED.clear()
        block = (hashlib.sha256(secret).digest() if len(secret) > _SHA256_BLOCK else secret).ljust(_SHA256_BLOCK, b"\0")
        keyed = _KEYED[secret] = (hashlib.sha256(block.translate(_IPAD)), hashlib.sha256(block.translate(_OPAD)))
    inner_keyed, outer_keyed = keyed
    inner = inner_keyed.copy()
    inner.update(content)
    outer = outer_keyed.copy()
    outer.update(inner.digest())
    return outer.hexdigest()


#: The MAC's hex digest as check_integrity computes it, for the engine's clean path (byzguard.engine.verify_clean).
hmac_sha256: Final = _hmac_sha256


_SHA256_BLOCK: Final = 64
_IPAD: Final = bytes(b ^ 0x36 for b in range(256))
_OPAD: Final = bytes(b ^ 0x5C for b in range(256))


def content_hash(content: bytes) -> bytes:
    """The guard's own 16-byte fingerprint of covered content (idempotency and version conflicts)."""
    return xxhash.xxh3_128_digest(content)


# -- integrity forms -------------------------------------------------------------------------------------

BOUND: Final = "bound"
VALUE_ONLY: Final = "value-only"
JS_SORTED: Final = "js-sorted"
JS_STRINGIFY: Final = "js-stringify"
WHOLE_OBJECT: Final = "whole-object"
PYTHON_SORTED: Final = "python-sorted"


@dataclass(frozen=True, slots=True)
class Form:
    """A named integrity form: what its checksum covers, and whether that binds the event's attributes."""

    name: str
    binds_attributes: bool
    covers: str


# In the order the failure path tries them.
FORMS: Final[Mapping[str, Form]] = {f.name: f for f in (
    Form(BOUND, True, "the attributes and the data (ENVELOPE.md)"),
    Form(VALUE_ONLY, False, "the data only: the value bytes (binary mode) or the RFC 8785 form of data"),
    Form(JS_SORTED, False, "the data as JSON.stringify writes it after sorting keys recursively: integer-like "
                           "keys first, unlike RFC 8785"),
    Form(JS_STRINGIFY, False, "the data as JSON.stringify writes it, keys in the order sent, not canonicalized"),
    Form(WHOLE_OBJECT, False, "the RFC 8785 form of the whole JSON value without its checksum member, "
                              "instead of data"),
    Form(PYTHON_SORTED, False, "the data as Python's json.dumps(data, sort_keys=True) writes it"),
)}
#: What every source may use: the bound form. Other forms are accepted only for sources declared to use them.
DEFAULT_FORMS: Final = frozenset({BOUND})
#: Above this much data the failure path tries the JSON re-serializations only for forms the source is
#: declared to use: a flood of large records with bad checksums must not cost a serialization each.
DIAGNOSE_MAX_BYTES: Final = 256 * 1024
_CHEAP: Final = frozenset({BOUND, VALUE_ONLY})

_LF: Final = b"\n"


def bound_base(id: bytes, source: bytes, type: bytes, subject: bytes, attrs: Mapping[str, bytes],
               algorithm: bytes, key_id: bytes | None, data: bytes) -> bytes | None:
    """The bound form's signature base (ENVELOPE.md), one line per present component in a fixed order and
    the data last; None when a component holds a line feed (the base would be ambiguous). Producers and the
    guard both call this: the texts as UTF-8 bytes; `attrs` holds the optional components under their
    binary-mode header names (ce_time, ce_entityversion, ce_lamporttime, ce_lamportinstance, ce_vectorclock,
    content-type), also in structured mode."""
    # This runs on every event: no loop, one join, one scan for line feeds.
    get = attrs.get
    time = get("ce_time")
    version = get("ce_entityversion")
    lamport = get("ce_lamporttime")
    instance = get("ce_lamportinstance")
    vclock = get("ce_vectorclock")
    content_type = get("content-type")
    base = b"".join((
        b"checksumform: bound\nid: ", id, b"\nsource: ", source, b"\ntype: ", type, b"\nsubject: ", subject,
        b"" if time is None else b"\ntime: " + time,
        b"" if version is None else b"\nentityversion: " + version,
        b"" if lamport is None else b"\nlamporttime: " + lamport,
        b"" if instance is None else b"\nlamportinstance: " + instance,
        b"" if vclock is None else b"\nvectorclock: " + vclock,
        b"" if content_type is None else b"\ndatacontenttype: " + content_type,
        b"\nchecksumalg: ", algorithm,
        b"" if key_id is None else b"\nkeyid: " + key_id,
        b"\ndata: ", data,
    ))
    lines = (6 + (time is not None) + (version is not None) + (lamport is not None) + (instance is not None)
             + (vclock is not None) + (content_type is not None) + (key_id is not None))
    if base.count(_LF, 0, len(base) - len(data)) != lines:
        return None
    return base


def _bound(env: Envelope) -> bytes | None:
    base = env.bound
    if base is not None:  # decode built it (the structured fast path)
        return base
    attrs = env.attrs
    checksum = env.checksum
    if attrs is None or checksum is None:
        return None  # the seed's shapes have no attributes to bind
    # Binary mode's header map holds the texts as sent; structured mode's are encoded here.
    get = attrs.get
    key_id = get("ce_keyid")
    if key_id is None and checksum.key_id is not None:
        key_id = checksum.key_id.encode()
    return bound_base(get("ce_id") or env.id.encode(), get("ce_source") or env.source.encode(),
                      get("ce_type") or env.type.encode(), get("ce_subject") or env.subject.encode(), attrs,
                      get("ce_checksumalg") or checksum.algorithm.encode(), key_id, env.covered)


def _whole_object(env: Envelope) -> bytes | None:
    obj = env.obj
    if obj is None:
        return None
    return canonicalize({k: v for k, v in obj.items() if k != "checksum"})


def _value_only(env: Envelope) -> bytes:
    covered: bytes = env.covered
    return covered


def _python_sorted(env: Envelope) -> bytes:
    return json.dumps(env.data(), sort_keys=True).encode()


_INPUTS: Final[Mapping[str, Callable[[Envelope], bytes | None]]] = {
    BOUND: _bound,
    VALUE_ONLY: _value_only,
    JS_SORTED: lambda env: js_sorted(env.data()),
    JS_STRINGIFY: lambda env: js_stringify(env.data()),
    WHOLE_OBJECT: _whole_object,
    PYTHON_SORTED: _python_sorted,
}


def form_input(form: str, env: Envelope) -> bytes | None:
    """The bytes form `form` of `env` covers, or None when the form does not apply to this event."""
    try:
        return _INPUTS[form](env)
    except (CanonicalizationError, TypeError, ValueError, RecursionError):
        return None  # this form has no bytes for this event: it cannot be the one its checksum was made in


def _matches(algorithm: str, content: bytes, key: Key | None, claimed: str) -> bool:
    if algorithm == HMAC_SHA256:
        assert key is not None
        return hmac.compare_digest(_hmac_sha256(key.secret, content), claimed)
    return digest(algorithm, content) == claimed


def check_integrity(
    env: Envelope,
    accepted: Collection[str],
    keyring: KeyRing,
    *,
    required: bool,
) -> list[tuple[Code, str]]:
    """Codes and details of every integrity or authorship failure of `env`; empty when it checks out.

    `accepted` holds the forms its source may use (`DEFAULT_FORMS` unless declared otherwise). An event in
    an accepted form that does not bind the attributes passes with `integrity.legacy_form` (a warning).
    Only when the checksum fails under the form the event declares are the other forms tried, so that the
    reason can say which form the producer used (`integrity.noncanonical`).
    """
    checksum = env.checksum
    if checksum is None:
        return [(Code.INTEGRITY_MISSING, "the route requires a checksum or MAC")] if required else []
    algorithm = checksum.algorithm
    if algorithm == HMAC_SHA256 and env.form == BOUND and BOUND in accepted:
        # The common case, a MAC over the bound form by the source's own key, with the fewest steps: when the
        # MAC matches there is nothing to report, when it does not the failure path says why.
        key_id = checksum.key_id
        key = keyring.get(key_id) if key_id else None
        if key is not None and key.source == env.source:
            content = form_input(BOUND, env)
            claimed = checksum.value.lower()
            if content is not None and hmac.compare_digest(_hmac_sha256(key.secret, content), claimed):
                return []
            return _diagnose(env, accepted, algorithm, BOUND, key, claimed, content, [])
    if algorithm not in ALGORITHMS:
        return [(Code.INTEGRITY_UNKNOWN_ALGORITHM, f"algorithm {quote(algorithm)} is not one of {sorted(ALGORITHMS)}")]
    declared = env.form
    if declared not in FORMS:
        return [(Code.INTEGRITY_UNKNOWN_ALGORITHM, f"checksum form {quote(declared)} is not one of {list(FORMS)}")]
    claimed = checksum.value.lower()
    failures: list[tuple[Code, str]] = []
    key = None
    if algorithm == HMAC_SHA256:
        key = keyring.get(checksum.key_id) if checksum.key_id else None
        if key is None:
            if not checksum.key_id:
                return [(Code.INTEGRITY_UNKNOWN_KEY, "an hmac-sha256 MAC without a key id (ce_keyid)")]
            return [(Code.INTEGRITY_UNKNOWN_KEY, f"key id {quote(checksum.key_id)} is not in the key ring")]
        if key.source != env.source:
            failures.append((Code.SOURCE_FORGED, f"signed with key {key.key_id!r} of source {key.source!r}, "
                             f"claims source {quote(env.source)}"))
    content = form_input(declared, env)
    if content is not None and _matches(algorithm, content, key, claimed):
        if declared not in accepted:
            failures.append((Code.INTEGRITY_UNBOUND, _not_accepted(env, declared, accepted)))
        elif not FORMS[declared].binds_attributes:
            failures.append((Code.INTEGRITY_LEGACY_FORM, f"the {algorithm} covers {FORMS[declared].covers}; "
                             f"form {declared!r} is accepted for source {quote(env.source)}, but its attributes "
                             "are not protected"))
        return failures
    return _diagnose(env, accepted, algorithm, declared, key, claimed, content, failures)


def _diagnose(env: Envelope, accepted: Collection[str], algorithm: str, declared: str, key: Key | None,
              claimed: str, content: bytes | None, failures: list[tuple[Code, str]]) -> list[tuple[Code, str]]:
    """The failure path, once the checksum failed under the declared form (`content` the bytes it was
    computed over): which form, if any, was the checksum made in?"""
    big = len(env.covered) > DIAGNOSE_MAX_BYTES
    for form in FORMS:
        if form == declared or (big and form not in _CHEAP and form not in accepted):
            continue
        other = form_input(form, env)
        if other is None or not _matches(algorithm, other, key, claimed):
            continue
        said = f"the {algorithm} matches form {form!r} ({FORMS[form].covers}), not the declared {declared!r}"
        if form in accepted:
            failures.append((Code.INTEGRITY_LEGACY_FORM, f"{said}; accepted for source {quote(env.source)}"
                             + ("" if FORMS[form].binds_attributes else ", but its attributes are not protected")))
        else:
            failures.append((Code.INTEGRITY_NONCANONICAL, f"{said}; {_declare_hint(env, form)}"))
        return failures
    untried = f" (JSON re-serializations not tried above {DIAGNOSE_MAX_BYTES} bytes)" if big else ""
    if key is not None:
        failures.append((Code.INTEGRITY_BAD_MAC,
                         f"MAC does not match the {declared} form under key {key.key_id!r}{untried}"))
    else:
        actual = digest(algorithm, content) if content is not None else "nothing (the form does not apply)"
        failures.append((Code.INTEGRITY_MISMATCH,
                         f"{algorithm} expected {quote(claimed)}, the {declared} form hashes to {actual}{untried}"))
    return failures


def _declare_hint(env: Envelope, form: str) -> str:
    return (f"source {quote(env.source)} is not declared to use it (configuration: sources: "
            f"{{{quote(env.source)}: {{forms: [{form}]}}}})")


def _not_accepted(env: Envelope, form: str, accepted: Collection[str]) -> str:
    return (f"the checksum covers {FORMS[form].covers} (form {form!r}), not the attributes; "
            f"{_declare_hint(env, form)}, so only {sorted(accepted)} is accepted")
