"""Checksums and MACs over the bytes an event's checksum covers, and the key ring that proves who wrote it.

Binary mode covers the Kafka value as sent; structured and seed modes cover the RFC 8785 form of `data`.
A MAC proves authorship: a key id belongs to exactly one source, so a MAC made with another source's key
is a forgery (`source.forged`), never a pass.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import xxhash

from byzguard.errors import KeyRingError
from byzguard.verdict import Code, quote

SHA256 = "sha256"
XXH3_128 = "xxh3-128"
HMAC_SHA256 = "hmac-sha256"
ALGORITHMS = frozenset({SHA256, XXH3_128, HMAC_SHA256})

# HMAC-SHA256 keyed once per secret: each MAC copies the keyed state instead of hashing the key pads again.
# Bounded, since producers may sign with keys of their own; cleared when full (rebuilding one costs a MAC).
_KEYED: dict[bytes, hmac.HMAC] = {}
_KEYED_MAX = 64


@dataclass(frozen=True, slots=True)
class Checksum:
    """What the producer stamped: algorithm, hex digest and, for MACs, the key id."""

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
    """hmac.new(secret, content, sha256).hexdigest(), from a keyed state made once per secret."""
    keyed = _KEYED.get(secret)
    if keyed is None:
        if len(_KEYED) >= _KEYED_MAX:
            _KEYED.clear()
        keyed = _KEYED[secret] = hmac.new(secret, digestmod=hashlib.sha256)
    mac = keyed.copy()
    mac.update(content)
    return mac.hexdigest()


def content_hash(content: bytes) -> bytes:
    """The guard's own 16-byte fingerprint of covered content (idempotency and version conflicts)."""
    return xxhash.xxh3_128_digest(content)


def check_integrity(
    checksum: Checksum | None,
    content: bytes,
    source: str,
    keyring: KeyRing,
    *,
    required: bool,
) -> list[tuple[Code, str]]:
    """Codes and details of every integrity or authorship failure; empty when the event checks out."""
    if checksum is None:
        return [(Code.INTEGRITY_MISSING, "the route requires a checksum or MAC")] if required else []
    algorithm = checksum.algorithm
    if algorithm not in ALGORITHMS:
        return [(Code.INTEGRITY_UNKNOWN_ALGORITHM, f"algorithm {quote(algorithm)} is not one of {sorted(ALGORITHMS)}")]
    claimed = checksum.value.lower()
    if algorithm == HMAC_SHA256:
        key = keyring.get(checksum.key_id) if checksum.key_id else None
        if key is None:
            if not checksum.key_id:
                return [(Code.INTEGRITY_UNKNOWN_KEY, "an hmac-sha256 MAC without a key id (ce_keyid)")]
            return [(Code.INTEGRITY_UNKNOWN_KEY, f"key id {quote(checksum.key_id)} is not in the key ring")]
        failures: list[tuple[Code, str]] = []
        if key.source != source:
            failures.append((Code.SOURCE_FORGED,
                             f"signed with key {key.key_id!r} of source {key.source!r}, claims source {quote(source)}"))
        if not hmac.compare_digest(digest(HMAC_SHA256, content, key), claimed):
            failures.append((Code.INTEGRITY_BAD_MAC, f"MAC does not match the content under key {key.key_id!r}"))
        return failures
    actual = digest(algorithm, content)
    if actual != claimed:
        return [(Code.INTEGRITY_MISMATCH, f"{algorithm} expected {quote(claimed)}, content hashes to {actual!r}")]
    return []
