"""Decode a Kafka record (key, value, headers) into an Envelope, or into decode reasons. Never raises.

Accepted shapes (ENVELOPE.md has them byte for byte):
- CloudEvents binary mode: `ce_specversion` header present; the value is the data as the producer wrote it;
  attributes in `ce_*` headers; the data the checksum covers is the value bytes.
- CloudEvents structured mode: a JSON object with `specversion`; the data the checksum covers is JCS(`data`).
- The seed article's shapes: `{data, checksum}`, `{data, version, updatedAt, source}` and
  `{payload, logicalTimestamp, sourceService}`; the checksum (if any) covers JCS(`data`) only.
The integrity form (`ce_checksumform`, default `value-only`) says whether the checksum also binds the
attributes; the envelope keeps what each form needs (byzguard.integrity.form_input).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, Final

import orjson
import xxhash

from byzguard.clocks import VectorClock, check_instance, remember
from byzguard.errors import ClockError
from byzguard.integrity import BOUND, SHA256, VALUE_ONLY, Checksum, content_hash
from byzguard.isotime import LAST as _LAST_TIME
from byzguard.jcs import _FAST as _JCS_FAST
from byzguard.jcs import CanonicalizationError, _prepare, canonicalize
from byzguard.verdict import Code, quote

# Header names of the CloudEvents Kafka binding, plus byzguard's extension attributes.
CE_SPECVERSION = "ce_specversion"
CE_ID = "ce_id"
CE_SOURCE = "ce_source"
CE_TYPE = "ce_type"
CE_TIME = "ce_time"
CE_SUBJECT = "ce_subject"
CE_ENTITYVERSION = "ce_entityversion"
CE_LAMPORTTIME = "ce_lamporttime"
CE_LAMPORTINSTANCE = "ce_lamportinstance"
CE_VECTORCLOCK = "ce_vectorclock"
CE_CHECKSUMALG = "ce_checksumalg"
CE_CHECKSUM = "ce_checksum"
CE_KEYID = "ce_keyid"
CE_CHECKSUMFORM = "ce_checksumform"
CONTENT_TYPE = "content-type"

MODE_BINARY = "binary"
MODE_STRUCTURED = "structured"
MODE_SEED = "seed"

MAX_INT = 2**63 - 1
# CloudEvents attributes that none of the seed's shapes has at its top level.
_CE_ONLY_ATTRIBUTES = ("id", "type", "subject", "time", "datacontenttype")


class Envelope:
    """An event as the checks see it: attributes, clocks, checksum and the bytes the checksum covers."""

    __slots__ = (
        "_attrs",
        "_data",
        "_parsed",
        "bound",
        "checksum",
        "content_hash",
        "covered",
        "form",
        "id",
        "instance",
        "lamport",
        "mode",
        "obj",
        "refused",
        "source",
        "subject",
        "time",
        "type",
        "vclock",
        "version",
    )

    def __init__(
        self,
        *,
        id: str,
        source: str,
        type: str,
        subject: str,
        mode: str,
        covered: bytes,
        time: float | None = None,
        version: int | None = None,
        lamport: int | None = None,
        vclock: VectorClock | None = None,
        checksum: Checksum | None = None,
        data: Any = None,
        parsed: bool = False,
        instance: str | None = None,
        form: str = VALUE_ONLY,
        attrs: Mapping[str, bytes] | None = None,
        obj: dict[str, Any] | None = None,
        refused: tuple[Code, str] | None = None,
    ) -> None:
        self.id = id
        self.source = source
        self.type = type
        self.subject = subject
        self.mode = mode
        self.covered = covered
        self.content_hash = content_hash(covered)
        self.time = time
        self.version = version
        self.lamport = lamport
        self.instance = instance  # the producer instance whose Lamport clock `lamport` reads
        self.vclock = vclock
        self.checksum = checksum
        self._data = data
        self._parsed = parsed
        # The integrity form the event declares; the optional attributes the bound form covers, as sent
        # (binary mode: the header map; None for the seed's shapes); the JSON value (structured and seed).
        self.form = form
        self._attrs: Any = attrs
        self.obj = obj
        #: The bound form's signature base when decode built it on the way (byzguard.integrity._bound), else None.
        self.bound: bytes | None = None
        #: Why data declared JSON cannot be read (decode.malformed, decode.ambiguous). The verdict reports it
        #: after the integrity checks, so corruption in transit is still told apart from a producer's garbage.
        self.refused = refused

    @property
    def attrs(self) -> Mapping[str, bytes] | None:
        """The optional attributes the bound form covers, under their binary-mode header names, as sent (binary
        mode: the header map; structured mode: their texts, built on first use; None for the seed's shapes)."""
        attrs = self._attrs
        if attrs is _UNBUILT:
            attrs = self._attrs = _structured_attrs(self.obj, self.vclock)  # type: ignore[arg-type]
        return attrs  # type: ignore[no-any-return]

    def data(self) -> Any:
        """The event's data as JSON values, parsed on first use; None when it is not JSON."""
        if not self._parsed:
            self._parsed = True
            try:
                self._data = orjson.loads(self.covered)
            except orjson.JSONDecodeError:
                self._data = None
        return self._data

    def attributes(self) -> dict[str, Any]:
        """The envelope attributes as a plain mapping (for rules, receipts and the review page)."""
        return {"id": self.id, "source": self.source, "type": self.type, "subject": self.subject,
                "time": self.time, "version": self.version, "lamport": self.lamport,
                "vclock": self.vclock.to_header().decode() if self.vclock is not None else None}


class DecodeFailure(Exception):
    def __init__(self, code: Code, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def decode(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes],
    default_type: str = "",
    default_source: str | None = None,
) -> Envelope | tuple[Code, str]:
    """Decode one record; a (code, detail) pair when it cannot be read. Any bytes in, never an exception.

    `default_source` is the source an input topic declares for records that name none. (`default_type` and
    `default_source` may be given by position: the guard does, a keyword call costs more per record.)"""
    try:
        hdrs = _header_map(headers)
        if CE_SPECVERSION in hdrs:
            if default_source is not None and CE_SOURCE not in hdrs:
                hdrs[CE_SOURCE] = default_source.encode()
            return _decode_binary(key, value, hdrs, default_type)
        if not value:
            raise DecodeFailure(Code.DECODE_UNSUPPORTED, "empty value and no ce_specversion header")
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise DecodeFailure(Code.DECODE_MALFORMED, f"value is not JSON and has no ce_* headers: {exc}") from None
        if not isinstance(obj, dict):
            raise DecodeFailure(Code.DECODE_UNSUPPORTED, "value is JSON but not an object")
        try:  # unambiguous's first test inline: orjson writes the value back byte for byte
            written = _dumps(obj)
        except orjson.JSONEncodeError:
            written = b""
        if written != value:
            unambiguous(value, obj, "value")
        if "specversion" in obj:
            # No backslash in the text: no string of it holds a line feed (JSON has none unescaped), which
            # spares _fast_structured its count of the bound form's lines. (An int operand: `bytes in bytes`
            # first tries the operand as an int and clears the TypeError, which costs more than the search.)
            return _fast_structured(key, obj, default_type, default_source, _BACKSLASH in value) or \
                _decode_structured(key, value, obj, hdrs, default_type, default_source)
        attributes = [name for name in _CE_ONLY_ATTRIBUTES if name in obj]
        if attributes:  # a structured event without its specversion: not to be read as one of the seed's shapes
            raise DecodeFailure(Code.DECODE_MALFORMED, "required attribute missing: specversion (the object has the "
                                f"CloudEvents attributes {', '.join(attributes)}; structured mode needs "
                                '"specversion": "1.0")')
        return _decode_seed(key, value, obj, hdrs, default_type, default_source)
    except DecodeFailure as failure:
        return failure.code, failure.detail
    except Exception as exc:  # decoding must never take the worker down: the record is at fault
        return Code.DECODE_MALFORMED, f"{type(exc).__name__}: {quote(str(exc))}"


def decode_many(records: Sequence[tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes]] | Mapping[str, bytes],
                                    str | None]],
                default_type: str = "") -> list[Envelope | tuple[Code, str]]:
    """`decode(key, value, headers, default_type, default_source)` of each (key, value, headers, default_source),
    in passes over them (a pass runs one small piece of code over and over, which the CPU runs faster than the
    whole of decode per record: bench/results/core-*/NOTE.md of issue 21): the header check, the parse, the
    round-trip test of unambiguity, the structured fast path. These are decode's steps for the common structured
    event, in its order; a record that leaves them anywhere (a ce_* header, not a JSON object, a text orjson does
    not write back byte for byte, anything the fast path leaves to the strict one, any exception) is decoded by
    `decode` itself, from the start. So each result is decode's."""
    # Pass 1: the headers (no ce_specversion: not binary mode; no repeated attribute) and the value parsed.
    objs: list[Any] = []
    for _, value, headers, _ in records:
        obj = None
        if value:
            try:
                if CE_SPECVERSION not in _header_map(headers):
                    obj = _loads(value)
            except Exception:
                obj = None
        objs.append(obj if type(obj) is dict else None)
    # Pass 2: written back byte for byte (unambiguous's first test, as decode makes it).
    for i, ((_, value, _, _), obj) in enumerate(zip(records, objs, strict=True)):
        if obj is not None:
            try:
                if _dumps(obj) != value or "specversion" not in obj:
                    objs[i] = None
            except Exception:
                objs[i] = None
    # Pass 3: the structured fast path; then decode for whatever left the passes.
    decoded: list[Envelope | tuple[Code, str] | None] = [
        None if obj is None or value is None
        else _fast_structured(key, obj, default_type, default_source, _BACKSLASH in value)
        for (key, value, _, default_source), obj in zip(records, objs, strict=True)]
    return [decode(key, value, headers, default_type, default_source) if env is None else env
            for (key, value, headers, default_source), env in zip(records, decoded, strict=True)]


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _DuplicateKey(name)
            seen.add(name)
    return obj


def unambiguous(text: bytes, parsed: Any, where: str) -> None:
    """Refuse JSON text in which an object repeats a key (decode.ambiguous): parsers disagree on which value
    counts (orjson and Python keep the last, others the first), so what byzguard checks may not be what a
    consumer reads.

    orjson cannot report duplicates, so cheap sufficient conditions for "no repeat" come first:
    - orjson writes the parsed value back byte for byte (compact JSON as orjson, JSON.stringify and most
      producers write it): text that is the serialization of the parsed value has no member it dropped;
    - every ':' of JSON text separates a member or sits in a string, and orjson's serialization has one ':'
      per member kept and the same ones in strings (it never escapes ':'): when the text has no more ':' than
      that (counting each `\\u003a` escape on the text's side), no member was dropped.
    Only when both fail (a repeat, or an unusual escape) does json's object_pairs_hook decide.
    """
    try:
        written = orjson.dumps(parsed)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper): the exact check decides
        written = b""
    if written == text:
        return
    colons = text.count(b":")
    if b"\\" in text:
        colons += text.count(b"\\u003a") + text.count(b"\\u003A")
    if written and colons == written.count(b":"):
        return
    try:
        json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as dup:
        raise DecodeFailure(Code.DECODE_AMBIGUOUS, f"{where}: an object has the key {quote(dup.key)} more than "
                            "once; JSON parsers differ on which value counts") from None
    except Exception as exc:  # too deep for json, say: what cannot be shown unambiguous is refused
        raise DecodeFailure(Code.DECODE_AMBIGUOUS, f"{where}: cannot check the JSON for repeated keys: "
                            f"{type(exc).__name__}") from None


def _is_json(content_type: bytes) -> bool:
    """True for `application/json` and `application/<anything>+json`, with or without parameters."""
    if content_type == b"application/json":
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _header_map(headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes]) -> dict[str, bytes]:
    items = headers if type(headers) is list else headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, bytes] = {}
    for name, raw in items:
        name = name.lower() if not name.islower() else name
        raw = raw if raw is not None else b""
        # Kafka allows repeated headers, and readers disagree on which one counts (first or last): an attribute
        # given twice with two values is as ambiguous as a JSON object that repeats a key.
        if name in out and out[name] != raw and (name.startswith("ce_") or name == CONTENT_TYPE):
            raise DecodeFailure(Code.DECODE_AMBIGUOUS, f"header {quote(name)} is repeated with different values")
        out[name] = raw
    return out


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeFailure(Code.DECODE_MALFORMED, f"header {name} is not UTF-8") from None


def _int(raw: object, name: str) -> int:
    if type(raw) is int and 0 <= raw <= MAX_INT:  # the common case, as JSON gives it
        return raw
    if isinstance(raw, bool):
        raise DecodeFailure(Code.DECODE_MALFORMED, f"{name} must be an integer, got a boolean")
    if isinstance(raw, bytes):
        raw = _text(raw, name)
    if isinstance(raw, str):
        if not raw.isascii() or not raw.isdigit():
            raise DecodeFailure(Code.DECODE_MALFORMED, f"{name} must be a non-negative integer, got {quote(raw)}")
        raw = int(raw)
    if not isinstance(raw, int) or raw < 0 or raw > MAX_INT:
        raise DecodeFailure(Code.DECODE_MALFORMED, f"{name} must be a non-negative 63-bit integer, got {quote(raw)}")
    return raw


def parse_time(raw: object, name: str) -> float:
    """RFC 3339 text (or, for the seed's JavaScript producers, epoch milliseconds) -> epoch seconds."""
    if isinstance(raw, bytes):
        raw = _text(raw, name)
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw) / 1000.0
    if not isinstance(raw, str):
        raise DecodeFailure(Code.DECODE_MALFORMED, f"{name} must be an RFC 3339 time, got {quote(raw)}")
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise DecodeFailure(Code.DECODE_MALFORMED, f"{name} is not an RFC 3339 time: {quote(raw)}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _instance(raw: object, name: str) -> str:
    if isinstance(raw, bytes):
        raw = _text(raw, name)
    if not isinstance(raw, str):
        raise DecodeFailure(Code.DECODE_MALFORMED, f"{name} must be a string, got {type(raw).__name__}")
    try:
        return check_instance(raw)
    except ClockError as exc:
        raise DecodeFailure(Code.DECODE_MALFORMED, f"{name}: {exc}") from None


def _vclock(raw: object, name: str) -> VectorClock:
    try:
        if isinstance(raw, (bytes, str)):
            return VectorClock.from_header(raw)
        if isinstance(raw, dict):
            return VectorClock.from_mapping(raw)
    except ClockError as exc:
        raise DecodeFailure(Code.DECODE_MALFORMED, f"{name}: {exc}") from None
    raise DecodeFailure(Code.DECODE_MALFORMED, f"{name} must be 'node=n,...' or an object, got {quote(raw)}")


def _subject(key: bytes | None, subject: str | None) -> str:
    key_text = None
    if key is not None:
        try:
            key_text = key.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeFailure(Code.DECODE_MALFORMED, "record key is not UTF-8") from None
    if subject is None:
        if not key_text:
            raise DecodeFailure(Code.DECODE_MALFORMED, "no entity id: neither a subject nor a record key")
        return key_text
    if key_text is not None and key_text != subject:
        # Entity state lives in the partition of its key; a record keyed otherwise would be checked
        # against the wrong state, so it is refused rather than guessed at.
        raise DecodeFailure(Code.DECODE_KEY_MISMATCH,
                            f"record key {quote(key_text)} is not the entity id (subject) {quote(subject)}")
    if not subject:
        raise DecodeFailure(Code.DECODE_MALFORMED, "empty subject")
    return subject


def _checksum(alg: object, value: object, key_id: object, where: str) -> Checksum | None:
    if value is None and alg is None:
        return None
    if not isinstance(value, str) or not value:
        raise DecodeFailure(Code.DECODE_MALFORMED, f"{where}: checksum must be a hex string")
    algorithm = alg if isinstance(alg, str) else SHA256
    if key_id is not None and not isinstance(key_id, str):
        raise DecodeFailure(Code.DECODE_MALFORMED, f"{where}: keyid must be a string")
    return Checksum(algorithm, value, key_id)


def _decode_binary(key: bytes | None, value: bytes | None, h: dict[str, bytes], default_type: str) -> Envelope:
    spec = h[CE_SPECVERSION]
    if spec != b"1.0":
        raise DecodeFailure(Code.DECODE_UNSUPPORTED, f"CloudEvents specversion {quote(spec)} is not 1.0")
    missing = [n for n in (CE_ID, CE_SOURCE) if not h.get(n)]
    if missing:
        raise DecodeFailure(Code.DECODE_MALFORMED, f"required headers missing: {', '.join(missing)}")
    raw_sum = h.get(CE_CHECKSUM)
    checksum = None
    if raw_sum is not None or CE_CHECKSUMALG in h:
        checksum = _checksum(
            _text(h[CE_CHECKSUMALG], CE_CHECKSUMALG) if CE_CHECKSUMALG in h else None,
            _text(raw_sum, CE_CHECKSUM) if raw_sum is not None else None,
            _text(h[CE_KEYID], CE_KEYID) if CE_KEYID in h else None,
            "headers",
        )
    ce_type = _text(h[CE_TYPE], CE_TYPE) if CE_TYPE in h else default_type
    if not ce_type:
        raise DecodeFailure(Code.DECODE_MALFORMED, "required header missing: ce_type")
    form = _text(h[CE_CHECKSUMFORM], CE_CHECKSUMFORM) if CE_CHECKSUMFORM in h else VALUE_ONLY
    data: Any = None
    json_data = False
    refused = None
    content_type = h.get(CONTENT_TYPE)
    if value and content_type is not None and _is_json(content_type):
        # Declared JSON: it must be JSON, whether or not a rule reads it, and mean one thing.
        json_data = True
        try:
            data = orjson.loads(value)
            unambiguous(value, data, "value")
        except orjson.JSONDecodeError as exc:
            data = None
            refused = (Code.DECODE_MALFORMED, f"value is declared {quote(content_type.decode('latin-1'))} but is "
                       f"not JSON: {exc}")
        except DecodeFailure as failure:
            data = None
            refused = (failure.code, failure.detail)
    return Envelope(
        id=_text(h[CE_ID], CE_ID),
        source=_text(h[CE_SOURCE], CE_SOURCE),
        type=ce_type,
        subject=_subject(key, _text(h[CE_SUBJECT], CE_SUBJECT) if CE_SUBJECT in h else None),
        mode=MODE_BINARY,
        covered=value or b"",
        time=parse_time(h[CE_TIME], CE_TIME) if CE_TIME in h else None,
        version=_int(h[CE_ENTITYVERSION], CE_ENTITYVERSION) if CE_ENTITYVERSION in h else None,
        lamport=_int(h[CE_LAMPORTTIME], CE_LAMPORTTIME) if CE_LAMPORTTIME in h else None,
        instance=_instance(h[CE_LAMPORTINSTANCE], CE_LAMPORTINSTANCE) if CE_LAMPORTINSTANCE in h else None,
        vclock=_vclock(h[CE_VECTORCLOCK], CE_VECTORCLOCK) if CE_VECTORCLOCK in h else None,
        checksum=checksum,
        form=form,
        attrs=h,
        data=data,
        parsed=json_data,
        refused=refused,
    )


def _str_attr(obj: dict[str, Any], name: str, *, required: bool) -> str | None:
    raw = obj.get(name)
    if type(raw) is str and raw:  # the common case, as JSON gives it
        return raw
    if raw is None:
        if required:
            raise DecodeFailure(Code.DECODE_MALFORMED, f"required attribute missing: {name}")
        return None
    if not isinstance(raw, str) or not raw:
        raise DecodeFailure(Code.DECODE_MALFORMED, f"attribute {name} must be a non-empty string")
    return raw


def _canonical(data: Any, where: str) -> bytes:
    try:
        return canonicalize(data)
    except CanonicalizationError as exc:
        raise DecodeFailure(Code.DECODE_MALFORMED, f"{where} cannot be canonicalized: {exc}") from None


_FAST_NAMES: Final = ("specversion", "id", "source", "type", "subject", "data", "time", "entityversion",
                      "lamporttime", "lamportinstance", "vectorclock", "datacontenttype", "checksumform",
                      "checksumalg", "checksum", "keyid")

_ALL_FAST: Final = itemgetter(*_FAST_NAMES)
_UNBUILT: Final = object()  # Envelope.attrs not built yet: built from obj on first use
_new: Final = object.__new__
_dumps: Final = orjson.dumps
_loads: Final = orjson.loads
_SORT_KEYS: Final = orjson.OPT_SORT_KEYS
_content_hash: Final = xxhash.xxh3_128_digest
_new_tuple: Final = tuple.__new__
# Bound once: `datetime.fromisoformat` binds the classmethod anew (a new method object) at every lookup.
_fromisoformat: Final = datetime.fromisoformat

# Texts already parsed or checked: a source's vector clocks repeat across entities (an entity's counters are
# small), and a producer instance id across its events. Clocks are immutable, so one object serves every
# event that sends the same text. Bounded against hostile input (cleared when full; `remember` for the clocks).
_VCLOCKS: dict[str, VectorClock] = {}
_INSTANCES: set[str] = set()
_MEMO_MAX: Final = 1024


def _vclock_text(text: str) -> VectorClock:
    vclock = _VCLOCKS.get(text)
    if vclock is None:
        vclock = remember(_VCLOCKS, text, VectorClock.from_header(text))
    return vclock


def _instance_text(instance: str) -> None:
    if instance not in _INSTANCES:
        check_instance(instance)
        if len(_INSTANCES) >= _MEMO_MAX:
            _INSTANCES.clear()
        _INSTANCES.add(instance)


def _fast_structured(key: bytes | None, obj: dict[str, Any], default_type: str,
                     default_source: str | None, escaped: bool = True) -> Envelope | None:
    """The common structured event (every attribute of the type JSON gives it, the clock in its header form,
    the time as RFC 3339 text) in the fewest steps; None for anything else, which _decode_structured then
    reads or refuses. Whatever this accepts, _decode_structured builds the very same envelope from; the
    bound form's signature base is built here too (byzguard.integrity.bound_base's bytes, from the texts).

    `escaped`: False only when the JSON text `obj` was parsed from has no backslash, so that none of its strings
    holds a line feed; the bound form's lines are then not counted unless a text came from elsewhere (the key,
    a default)."""
    try:
        # An event with every attribute (as a signing producer writes it) in one C call, else one get each.
        try:
            values = _ALL_FAST(obj) if len(obj) >= len(_FAST_NAMES) else map(obj.get, _FAST_NAMES)
        except KeyError:
            values = map(obj.get, _FAST_NAMES)
        (spec, id_, source, type_, subject, data, raw_time, version, lamport, instance, raw_vclock, content_type,
         form, algorithm, value, key_id) = values
        if spec != "1.0" or "data_base64" in obj:
            return None
        if type(id_) is not str or not id_:
            return None
        if type(source) is not str or not source:
            if source is not None or not default_source:
                return None
            source = default_source
            escaped = True
        if type(type_) is not str or not type_:
            if type_ is not None or not default_type:
                return None
            type_ = default_type
            escaped = True
        if subject is None:
            if not key:
                return None
            subject = key.decode()
            escaped = True
        elif type(subject) is not str or not subject or (key is not None and key != subject.encode()):
            return None
        # How many line feeds the bound form's head has when no component holds one (its lines are written
        # below, once the form is known to be bound).
        lines = 6
        time = None
        if raw_time is not None:
            if type(raw_time) is not str:
                return None
            parsed = _fromisoformat(raw_time)
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
                time = parsed.timestamp()
            else:
                time = parsed.timestamp()
                _LAST_TIME[0] = (raw_time, parsed, time)  # for a rule that reads the same text (isotime)
            lines += 1
        if version is not None:
            if type(version) is not int or not 0 <= version <= MAX_INT:
                return None
            lines += 1
        if lamport is not None:
            if type(lamport) is not int or not 0 <= lamport <= MAX_INT:
                return None
            lines += 1
        if instance is not None:
            if type(instance) is not str:
                return None
            if instance not in _INSTANCES:  # _instance_text's memo, without its call when it holds the id
                _instance_text(instance)
            lines += 1
        vclock = None
        if raw_vclock is not None:
            if type(raw_vclock) is not str:
                return None
            vclock = _VCLOCKS.get(raw_vclock)  # _vclock_text's memo, without its call when it holds the clock
            if vclock is None:
                vclock = _vclock_text(raw_vclock)
            lines += 1
        if content_type is not None:
            if type(content_type) is not str:
                return None
            lines += 1
        if form is None:
            if "checksumform" in obj:
                return None
            form = VALUE_ONLY
        elif type(form) is not str:
            return None
        checksum = None
        if value is not None or algorithm is not None:
            if type(value) is not str or not value or (algorithm is not None and type(algorithm) is not str) \
                    or (key_id is not None and type(key_id) is not str):
                return None
            if algorithm is None:
                algorithm = SHA256
            checksum = _new_tuple(Checksum, (algorithm, value, key_id))
        if _JCS_FAST and type(data) is dict:
            # jcs.canonicalize's fast path, inline; anything it would leave to its slow path (an exception here,
            # or a 4-byte UTF-8 character) goes to canonicalize itself.
            covered = _dumps(_prepare(data, data.items()), option=_SORT_KEYS)
            if not covered.isascii():
                covered = canonicalize(data)
        else:
            covered = canonicalize(data)
        env: Envelope = _new(Envelope)
        env.id = id_
        env.source = source
        env.type = type_
        env.subject = subject
        env.mode = MODE_STRUCTURED
        env.covered = covered
        env.content_hash = _content_hash(covered)  # integrity.content_hash, without its call
        env.time = time
        env.version = version
        env.lamport = lamport
        env.instance = instance
        env.vclock = vclock
        env.checksum = checksum
        env._data = data
        env._parsed = True
        env.form = form
        env._attrs = _UNBUILT
        env.obj = obj
        env.refused = None
        env.bound = None
        if form == BOUND and checksum is not None:
            # The bound form's lines (bound_base writes them as UTF-8): when the event has every optional
            # attribute and a key id (as a signing producer writes it), in one step; else line by line.
            if lines == 12 and key_id is not None:
                head = (f"checksumform: bound\nid: {id_}\nsource: {source}\ntype: {type_}\nsubject: {subject}"
                        f"\ntime: {raw_time}\nentityversion: {version}\nlamporttime: {lamport}"
                        f"\nlamportinstance: {instance}\nvectorclock: {raw_vclock}\ndatacontenttype: {content_type}"
                        f"\nchecksumalg: {algorithm}\nkeyid: {key_id}\ndata: ")
            else:
                time_line = "" if raw_time is None else "\ntime: " + raw_time
                version_line = "" if version is None else f"\nentityversion: {version}"
                lamport_line = "" if lamport is None else f"\nlamporttime: {lamport}"
                instance_line = "" if instance is None else "\nlamportinstance: " + instance
                vclock_line = "" if raw_vclock is None else "\nvectorclock: " + raw_vclock
                type_line = "" if content_type is None else "\ndatacontenttype: " + content_type
                head = (f"checksumform: bound\nid: {id_}\nsource: {source}\ntype: {type_}\nsubject: {subject}"
                        f"{time_line}{version_line}{lamport_line}{instance_line}{vclock_line}{type_line}"
                        f"\nchecksumalg: {algorithm}{'' if key_id is None else _KEYID_LINE + key_id}\ndata: ")
            if not escaped or head.count("\n") == lines + (key_id is not None):
                env.bound = head.encode() + covered
        return env
    except Exception:  # whatever fails here, the strict path names it
        return None


_KEYID_LINE: Final = "\nkeyid: "
_BACKSLASH: Final = 0x5C  # b"\\"[0]


def _decode_structured(
    key: bytes | None, value: bytes, obj: dict[str, Any], h: dict[str, bytes], default_type: str,
    default_source: str | None = None,
) -> Envelope:
    if obj.get("specversion") != "1.0":
        raise DecodeFailure(Code.DECODE_UNSUPPORTED,
                            f"CloudEvents specversion {quote(obj.get('specversion'))} is not 1.0")
    if "data_base64" in obj:
        raise DecodeFailure(Code.DECODE_UNSUPPORTED, "data_base64 is not supported; use binary mode")
    data = obj.get("data")
    covered = _canonical(data, "data")
    raw_version = obj.get("entityversion")
    raw_lamport = obj.get("lamporttime")
    raw_vclock = obj.get("vectorclock")
    raw_time = obj.get("time")
    time = parse_time(raw_time, "time") if raw_time is not None else None
    version = _int(raw_version, "entityversion") if raw_version is not None else None
    lamport = _int(raw_lamport, "lamporttime") if raw_lamport is not None else None
    vclock = _vclock(raw_vclock, "vectorclock") if raw_vclock is not None else None
    form = obj.get("checksumform", VALUE_ONLY)
    if not isinstance(form, str):
        raise DecodeFailure(Code.DECODE_MALFORMED, "attribute checksumform must be a string")
    attrs = _structured_attrs(obj, vclock)
    instance = obj.get("lamportinstance")
    return Envelope(
        id=_str_attr(obj, "id", required=True) or "",
        source=_str_attr(obj, "source", required=default_source is None) or default_source or "",
        type=_str_attr(obj, "type", required=not default_type) or default_type,
        subject=_subject(key, _str_attr(obj, "subject", required=False)),
        mode=MODE_STRUCTURED,
        covered=covered,
        time=time,
        version=version,
        lamport=lamport,
        instance=_instance(instance, "lamportinstance") if instance is not None else None,
        vclock=vclock,
        checksum=_checksum(obj.get("checksumalg"), obj.get("checksum"), obj.get("keyid"), "structured event"),
        data=data,
        parsed=True,
        form=form,
        attrs=attrs,
        obj=obj,
    )


def _structured_attrs(obj: dict[str, Any], vclock: VectorClock | None) -> dict[str, bytes]:
    """The attributes of a structured event that the bound form covers, as text (ENVELOPE.md): strings as they
    are, numbers in their RFC 8785 form, a vector clock object in its header form (`vclock`, as parsed)."""
    attrs: dict[str, bytes] = {}
    raw_time = obj.get("time")
    if raw_time is not None:
        attrs[CE_TIME] = _attr_text(raw_time)
    raw_version = obj.get("entityversion")
    if raw_version is not None:
        attrs[CE_ENTITYVERSION] = _attr_text(raw_version)
    raw_lamport = obj.get("lamporttime")
    if raw_lamport is not None:
        attrs[CE_LAMPORTTIME] = _attr_text(raw_lamport)
    instance = obj.get("lamportinstance")
    if instance is not None:
        attrs[CE_LAMPORTINSTANCE] = _attr_text(instance)
    if vclock is not None:
        raw_vclock = obj.get("vectorclock")
        attrs[CE_VECTORCLOCK] = raw_vclock.encode() if isinstance(raw_vclock, str) else vclock.to_header()
    content_type = obj.get("datacontenttype")
    if content_type is not None:
        attrs[CONTENT_TYPE] = _attr_text(content_type)
    return attrs


def _attr_text(value: object) -> bytes:
    if type(value) is str:
        return value.encode()
    if type(value) is int:  # what JCS writes for the integers the attributes may hold, without its call
        return b"%d" % value
    return _canonical(value, "attribute")


def _decode_seed(
    key: bytes | None, value: bytes, obj: dict[str, Any], h: dict[str, bytes], default_type: str,
    default_source: str | None = None,
) -> Envelope:
    if "payload" in obj and "logicalTimestamp" in obj:
        data = obj["payload"]
        source = obj.get("sourceService")
        lamport: int | None = _int(obj["logicalTimestamp"], "logicalTimestamp")
        version = None
        time = None
    elif "data" in obj and ("checksum" in obj or "version" in obj or "updatedAt" in obj):
        data = obj["data"]
        source = obj.get("source")
        lamport = None
        version = _int(obj["version"], "version") if obj.get("version") is not None else None
        time = parse_time(obj["updatedAt"], "updatedAt") if obj.get("updatedAt") is not None else None
    else:
        raise DecodeFailure(Code.DECODE_UNSUPPORTED,
                            "JSON object is neither a CloudEvent (specversion) nor one of the seed shapes")
    if source is None and CE_SOURCE in h:
        source = _text(h[CE_SOURCE], CE_SOURCE)
    if source is None:
        source = default_source
    if not isinstance(source, str) or not source:
        raise DecodeFailure(Code.DECODE_MALFORMED, "no source: give source/sourceService or a ce_source header, "
                            "or declare the input topic's source in the route")
    covered = _canonical(data, "data")
    # Seed producers send no event id; the content then names the event, so a re-send is a duplicate.
    event_id = _text(h[CE_ID], CE_ID) if CE_ID in h else "xxh3:" + xxhash.xxh3_128_hexdigest(value)
    ce_type = _text(h[CE_TYPE], CE_TYPE) if CE_TYPE in h else default_type
    if not ce_type:
        raise DecodeFailure(Code.DECODE_MALFORMED, "no event type: set ce_type or the topic's default_type")
    raw_sum = obj.get("checksum")
    return Envelope(
        id=event_id,
        source=source,
        type=ce_type,
        subject=_subject(key, _text(h[CE_SUBJECT], CE_SUBJECT) if CE_SUBJECT in h else None),
        mode=MODE_SEED,
        covered=covered,
        time=time,
        version=version,
        lamport=lamport,
        checksum=_checksum(obj.get("checksumalg", SHA256), raw_sum, obj.get("keyid"), "seed event")
        if raw_sum is not None else None,
        data=data,
        parsed=True,
        form=_text(h[CE_CHECKSUMFORM], CE_CHECKSUMFORM) if CE_CHECKSUMFORM in h else VALUE_ONLY,
        obj=obj,
    )
