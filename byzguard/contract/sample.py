"""A contract sample: the records a producer emits, in order, from whatever shape the caller has.

Accepted, per item (`as_record`):

- a `byzguard.guard.RecordIn` (kept as is);
- anything with `key`, `value` and `headers` attributes: `byzguard.stamp.Stamped`, aiokafka's
  `ConsumerRecord`, a `SampleRecord`;
- a `(key, value)` or `(key, value, headers)` tuple;
- a mapping shaped like a record, `{"key", "value" | "value_base64", "headers"}` (see `record_from_json`);
- any other mapping, list or JSON scalar: a plain event object, serialized as the record's value.

JSON lines (`parse_jsonl`) use the same rules. A record's `value` given as text is sent as its UTF-8
bytes, exactly: binary-mode checksums cover those bytes (and, in the bound form, the headers), so copy
the text and the headers the producer wrote. A value given as a JSON object is serialized compactly,
which only suits structured and seed-shaped events (their checksums cover the canonical form of `data`,
not the bytes). Give bytes as `value_base64`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from byzguard.guard import RecordIn

# The fields a JSON line may have to count as a record rather than a plain event object.
RECORD_FIELDS = frozenset({"key", "key_base64", "value", "value_base64", "headers", "topic", "partition",
                           "offset", "timestamp"})


class SampleError(ValueError):
    """An item of a sample cannot be read as a record; the message names the item."""


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """A record as a producer emits it: key, value and headers, no coordinates yet."""

    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


def _bytes(raw: object, what: str) -> bytes | None:
    if raw is None or isinstance(raw, bytes):
        return raw
    if isinstance(raw, bytearray | memoryview):
        return bytes(raw)
    if isinstance(raw, str):
        return raw.encode("utf-8")
    raise SampleError(f"{what} must be bytes or text, got {type(raw).__name__}")


def _b64(raw: object, what: str) -> bytes:
    if not isinstance(raw, str):
        raise SampleError(f"{what} must be base64 text")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SampleError(f"{what} is not valid base64: {exc}") from None


def _header_value(raw: object, name: str) -> bytes:
    if isinstance(raw, Mapping) and set(raw) == {"base64"}:
        return _b64(raw["base64"], f"header {name!r}")
    value = _bytes(raw, f"header {name!r}")
    return value if value is not None else b""


def _headers(raw: object) -> list[tuple[str, bytes]]:
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        items: Iterable[Any] = raw.items()
    elif isinstance(raw, list | tuple):
        items = raw
    else:
        raise SampleError("headers must be an object {name: value} or a list of [name, value] pairs")
    out: list[tuple[str, bytes]] = []
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 2 or not isinstance(item[0], str):
            raise SampleError(f"a header must be a [name, value] pair, got {item!r}")
        out.append((item[0], _header_value(item[1], item[0])))
    return out


def _value_of_event(obj: object) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError as exc:
        raise SampleError(f"the event is not JSON serializable: {exc}") from None


def is_record_shaped(obj: Mapping[str, Any]) -> bool:
    """True when a JSON object reads as a record (has a value and only record fields), not as an event."""
    return ("value" in obj or "value_base64" in obj) and set(obj) <= RECORD_FIELDS


def record_from_json(obj: Mapping[str, Any], *, topic: str = "", partition: int = 0, offset: int = 0) -> RecordIn:
    """A record from its JSON form: `key`/`key_base64`, `value` (text, or JSON) / `value_base64`, `headers`."""
    if "key_base64" in obj:
        key: bytes | None = _b64(obj["key_base64"], "key_base64")
    else:
        raw_key = obj.get("key")
        key = _bytes(raw_key if not isinstance(raw_key, int | float) else str(raw_key), "key")
    if "value_base64" in obj:
        value: bytes | None = _b64(obj["value_base64"], "value_base64")
    else:
        raw = obj.get("value")
        value = _bytes(raw, "value") if raw is None or isinstance(raw, str) else _value_of_event(raw)
    timestamp = obj.get("timestamp")
    if timestamp is not None and (not isinstance(timestamp, int | float) or isinstance(timestamp, bool)):
        raise SampleError("timestamp must be epoch seconds (a number)")
    p = obj.get("partition", partition)
    o = obj.get("offset", offset)
    t = obj.get("topic", topic)
    if not isinstance(p, int) or not isinstance(o, int) or not isinstance(t, str):
        raise SampleError("topic must be text, partition and offset integers")
    return RecordIn(key, value, _headers(obj.get("headers")), t, p, o,
                    float(timestamp) if timestamp is not None else None)


def as_record(item: object, *, index: int = 0, topic: str = "", key_field: str | None = None) -> RecordIn:
    """Coerce one sample item (see the module doc) into a RecordIn numbered `index` (its offset)."""
    if isinstance(item, RecordIn):
        return item
    if all(hasattr(item, a) for a in ("key", "value", "headers")):
        ts = getattr(item, "timestamp", None)
        if isinstance(ts, int) and not isinstance(ts, bool) and getattr(item, "timestamp_type", None) is not None:
            ts = ts / 1000.0  # a Kafka ConsumerRecord: milliseconds
        return RecordIn(
            _bytes(getattr(item, "key"), "key"),  # noqa: B009
            _bytes(getattr(item, "value"), "value"),  # noqa: B009
            _headers(list(getattr(item, "headers") or ())),  # noqa: B009
            str(getattr(item, "topic", topic) or topic),
            int(getattr(item, "partition", 0) or 0),
            int(getattr(item, "offset", index) if getattr(item, "offset", None) is not None else index),
            float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else None,
        )
    if isinstance(item, tuple) and len(item) in (2, 3):
        headers = _headers(item[2]) if len(item) == 3 else []
        return RecordIn(_bytes(item[0], "key"), _bytes(item[1], "value"), headers, topic, 0, index)
    if isinstance(item, Mapping) and is_record_shaped(item):
        return record_from_json(item, topic=topic, offset=index)
    # A plain event: the object is the value; its key comes from key_field or the event's own subject.
    key = _key_from(item, key_field)
    return RecordIn(key, _value_of_event(item), [], topic, 0, index)


def _key_from(event: object, key_field: str | None) -> bytes | None:
    if key_field is None:
        return None
    node: object = event
    for part in key_field.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise SampleError(f"the event has no field {key_field!r} to use as its key")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, str | int | float):
        raise SampleError(f"field {key_field!r} is not text or a number and cannot be the record key")
    return str(node).encode("utf-8")


def as_records(items: Iterable[object], *, topic: str = "", key_field: str | None = None) -> list[RecordIn]:
    """Coerce a whole sample, numbering items from 0; SampleError names the failing item."""
    out: list[RecordIn] = []
    for index, item in enumerate(items):
        try:
            out.append(as_record(item, index=index, topic=topic, key_field=key_field))
        except SampleError as exc:
            raise SampleError(f"item {index}: {exc}") from None
    return out


def parse_jsonl(lines: Iterable[str], *, topic: str = "", key_field: str | None = None,
                source: str = "<events>") -> Iterator[tuple[int, RecordIn]]:
    """(line number, record) for each non-blank line; SampleError says `source:line` on a bad one."""
    index = 0
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("//"):
            continue
        try:
            obj = orjson.loads(text)
            if isinstance(obj, Mapping) and is_record_shaped(obj):
                record = record_from_json(obj, topic=topic, offset=index)
            else:
                record = RecordIn(_key_from(obj, key_field), _value_of_event(obj), [], topic, 0, index)
        except orjson.JSONDecodeError as exc:
            raise SampleError(f"{source}:{number}: not JSON: {exc}") from None
        except SampleError as exc:
            raise SampleError(f"{source}:{number}: {exc}") from None
        index += 1
        yield number, record
