"""Headers byzguard adds to forwarded and quarantined records. Original headers are kept; ours replace,
never append, so a record that passes through twice does not grow.

What byzguard itself writes is bounded by construction, whatever the input: the reasons header holds at most
MAX_REASONS_BYTES (each detail at most MAX_DETAIL_CHARS), an event id longer than MAX_ID_BYTES is written as its
SHA-256 (receipt keys and bodies), and all of byzguard's headers on one record together stay under
OWN_HEADERS_MAX. So a copy of an input record fits any output topic with OWN_HEADERS_MAX of room above the input's
size; one that does not fit anyway (a record the producer compressed) is replaced by a stub (`too_large_stub`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import orjson

from byzguard.verdict import Code, Outcome, Reason

PREFIX = "byzguard_"
H_VERDICT = "byzguard_verdict"
H_REASONS = "byzguard_reasons"
H_ROUTE = "byzguard_route"
H_VERIFIED_AT = "byzguard_verified_at"
H_QUARANTINE_ID = "byzguard_quarantine_id"
H_ORIGINAL_TOPIC = "byzguard_original_topic"
H_ORIGINAL_PARTITION = "byzguard_original_partition"
H_ORIGINAL_OFFSET = "byzguard_original_offset"
H_ORIGINAL_TIMESTAMP = "byzguard_original_timestamp"
H_DETECTED_AT = "byzguard_detected_at"
H_STUB = "byzguard_stub"

#: A reason's detail is cut to this many characters in headers and receipts.
MAX_DETAIL_CHARS = 512
#: The reasons header (and a receipt's reasons) never exceeds this many bytes: later reasons are left out.
MAX_REASONS_BYTES = 8 * 1024
#: An event id longer than this (in UTF-8 bytes) is written as `sha256:<hex>` where byzguard writes an id.
MAX_ID_BYTES = 256
#: An upper bound on the size of the headers byzguard adds to one record (the reasons, coordinates with topic
#: names of at most 249 characters, times, route name) and of a stub's own fields: the room output topics get
#: above their inputs' message size limit.
OWN_HEADERS_MAX = 16 * 1024
#: A stub keeps the original key and headers only up to these sizes (each key or header value, and in all).
STUB_KEEP_BYTES = 256
STUB_HEADERS_MAX = 4 * 1024

Headers = list[tuple[str, bytes]]

_VERDICT_OF = {
    Outcome.VERIFIED: b"pass",
    Outcome.WARNED: b"warn",
    Outcome.SUSPECT: b"suspect",
    Outcome.QUARANTINED: b"reject",
}


# Headers a review tool adds to a record it sends back through the guard: they link the new verdict to the
# old one, so they travel on (replaced, like every other byzguard header, when added again).
KEPT = frozenset({"byzguard_recheck_of"})


def original_headers(headers: Iterable[tuple[str, bytes]] | None) -> Headers:
    """The producer's headers without any byzguard header a previous pass may have added."""
    return [(k, v) for k, v in (headers or ()) if not k.startswith(PREFIX) or k in KEPT]


def bounded_reasons(reasons: Sequence[Reason]) -> list[dict[str, str]]:
    """The reasons as JSON-ready dicts, each detail at most MAX_DETAIL_CHARS, together at most MAX_REASONS_BYTES
    once encoded; reasons past that are left out, and the last one kept says how many."""
    out: list[dict[str, str]] = []
    size = 2  # the brackets
    for i, reason in enumerate(reasons):
        item = reason.as_dict()
        detail = item["detail"]
        if len(detail) > MAX_DETAIL_CHARS:
            item["detail"] = f"{detail[:MAX_DETAIL_CHARS]}... ({len(detail) - MAX_DETAIL_CHARS} more characters)"
        cost = len(orjson.dumps(item)) + 1  # and its comma
        if size + cost > MAX_REASONS_BYTES - 64:  # 64: room for the note below
            if out:
                left = len(reasons) - i
                out[-1]["detail"] += f" (and {left} more reason{'s' if left != 1 else ''} not shown)"
            break
        out.append(item)
        size += cost
    return out


def encode_reasons(reasons: Sequence[Reason]) -> bytes:
    """The reasons as a JSON list of {check, code, severity, detail}, bounded (see `bounded_reasons`)."""
    return orjson.dumps(bounded_reasons(reasons))


def bounded_id(event_id: str) -> str:
    """`event_id` itself when at most MAX_ID_BYTES long, else `sha256:<hex of its UTF-8 bytes>`."""
    raw = event_id.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_ID_BYTES:
        return event_id
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def receipt_key(event_id: str) -> bytes:
    """The key of an event's receipt: its id, or the id's SHA-256 when the id is long (`bounded_id`)."""
    return bounded_id(event_id).encode("utf-8", "surrogatepass")


def decode_reasons(raw: bytes) -> list[dict[str, str]]:
    """Inverse of encode_reasons, for the review tools."""
    out: list[dict[str, str]] = orjson.loads(raw)
    return out


def quarantine_id(topic: str, partition: int, offset: int) -> str:
    """A stable id for a quarantined record: its coordinates, so a redelivered record keeps its id."""
    return f"{topic}-{partition}-{offset}"


# The last `now` formatted, by identity: a batch hands every record the same float object. Identity, not
# equality, since 0.0 == -0.0 but they are written differently. Kept as its header, (H_VERIFIED_AT, text).
_LAST_AT: list[tuple[object, tuple[str, bytes]]] = [(object(), (H_VERIFIED_AT, b""))]
# The verdict and route headers of verified_headers, built once: a header is an immutable (name, value) pair, so
# every record's list can hold the same one (the bytes sent are the same).
_VERDICT_HEADER: Final = {outcome: (H_VERDICT, text) for outcome, text in _VERDICT_OF.items()}
_ROUTE_HEADER: dict[str, tuple[str, bytes]] = {}
_ROUTE_HEADERS_MAX: Final = 256  # route names come from the configuration: a bound all the same


def _route_header(route: str) -> tuple[str, bytes]:
    """(H_ROUTE, the route name's bytes), remembered per name."""
    if len(_ROUTE_HEADER) >= _ROUTE_HEADERS_MAX:
        _ROUTE_HEADER.clear()
    header = _ROUTE_HEADER[route] = (H_ROUTE, route.encode())
    return header


def verified_headers(
    headers: Iterable[tuple[str, bytes]] | None, outcome: Outcome, reasons: Sequence[Reason], route: str,
    now: float,
) -> Headers:
    """Original headers plus the verdict (pass, warn or suspect) and any reasons."""
    # original_headers and the verified-at memo (_LAST_AT), inline: this runs for every verified event (a loop,
    # not a list comprehension: on Python 3.11 that is one more frame per call).
    out: Headers = []
    if headers:
        for k, v in headers:
            if not k.startswith(PREFIX) or k in KEPT:
                out.append((k, v))
    last, at = _LAST_AT[0]
    if now is not last:
        at = (H_VERIFIED_AT, f"{now:.6f}".encode())
        _LAST_AT[0] = (now, at)
    out.append(_VERDICT_HEADER[outcome])
    out.append(_ROUTE_HEADER.get(route) or _route_header(route))
    out.append(at)
    if reasons:
        out.append((H_REASONS, encode_reasons(reasons)))
    return out


def quarantine_headers(
    headers: Iterable[tuple[str, bytes]] | None,
    outcome: Outcome,
    reasons: Sequence[Reason],
    route: str,
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp: float | None,
    now: float,
) -> Headers:
    """Original headers plus reasons, quarantine id, original coordinates and the detection time."""
    out = original_headers(headers)
    out.extend([
        (H_VERDICT, _VERDICT_OF[outcome]),
        (H_ROUTE, route.encode()),
        (H_REASONS, encode_reasons(reasons)),
        (H_QUARANTINE_ID, quarantine_id(topic, partition, offset).encode()),
        (H_ORIGINAL_TOPIC, topic.encode()),
        (H_ORIGINAL_PARTITION, str(partition).encode()),
        (H_ORIGINAL_OFFSET, str(offset).encode()),
        (H_ORIGINAL_TIMESTAMP, f"{timestamp:.3f}".encode() if timestamp is not None else b""),
        (H_DETECTED_AT, f"{now:.6f}".encode()),
    ])
    return out


def receipt(event_id: str, outcome: Outcome, reasons: Sequence[Reason], route: str, *, topic: str, partition: int,
            offset: int, now: float) -> bytes:
    """The verdict on one event id, for producers that wait until their write is visible (read-after-write)."""
    return orjson.dumps({"id": bounded_id(event_id), "outcome": outcome.value, "route": route,
                         "reasons": bounded_reasons(reasons), "topic": topic, "partition": partition,
                         "offset": offset, "decided_at": now})


# A re-partitioned record carries where it was produced, so its verdict (and quarantine id) names the input.
H_REPARTITIONED_FROM = "byzguard_repartitioned_from"


def repartition_headers(headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None, topic: str,
                        partition: int, offset: int, timestamp: float | None) -> Headers:
    """The producer's headers, untouched, plus the record's input coordinates (any such header before replaced)."""
    items = headers.items() if isinstance(headers, Mapping) else headers or ()
    out = [h for h in items if h[0] != H_REPARTITIONED_FROM]
    out.append((H_REPARTITIONED_FROM, orjson.dumps([topic, partition, offset, timestamp])))
    return out


def repartitioned_from(headers: Sequence[tuple[str, bytes]] | None) -> tuple[str, int, int, float | None] | None:
    """Inverse of repartition_headers: (topic, partition, offset, timestamp) of the input record, or None."""
    for name, raw in reversed(headers or ()):
        if name == H_REPARTITIONED_FROM:
            try:  # a header not written by repartition_headers reads as none, whatever its shape
                topic, partition, offset, timestamp = orjson.loads(raw)
                return str(topic), int(partition), int(offset), None if timestamp is None else float(timestamp)
            except (orjson.JSONDecodeError, TypeError, ValueError):
                return None
    return None


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    """An upper bound on the bytes one record takes alone in a Kafka record batch (v2), what a broker compares
    with `max.message.bytes`: aiokafka's `DefaultRecordBatchBuilder.estimate_size_in_bytes` (batch header 61
    bytes, record overhead at most 21, each length as a varint of at most 5 bytes)."""
    # Runs once per input record: lengths only, a name counted at 4 bytes per character (UTF-8's most).
    size = 97 + (len(key) if key is not None else 0) + (len(value) if value is not None else 0) + 10 * len(headers)
    for name, raw in headers:
        size += 4 * len(name) + (len(raw) if raw else 0)
    return size


def too_large_stub(
    key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]] | None,
    reasons: Sequence[Reason], route: str, *, topic: str, partition: int, offset: int, timestamp: float | None,
    size: int, limit: int, now: float,
) -> tuple[bytes | None, bytes, Headers]:
    """A bounded quarantine record that stands for a record whose copy does not fit its destination: (key, value,
    headers). It points at the original's coordinates, with its size and the SHA-256 of its value; the reasons
    are `output.too_large` followed by any the record got. The original key and headers are kept where small
    (at most STUB_KEEP_BYTES each, STUB_HEADERS_MAX in all); a longer key becomes `sha256:<hex>`."""
    kept: Headers = []
    kept_size = 0
    dropped = 0
    for name, raw in original_headers(headers):
        cost = len(name) + len(raw or b"")
        if len(raw or b"") > STUB_KEEP_BYTES or len(name) > STUB_KEEP_BYTES or kept_size + cost > STUB_HEADERS_MAX:
            dropped += 1
            continue
        kept.append((name, raw))
        kept_size += cost
    if key is not None and len(key) > STUB_KEEP_BYTES:
        key = b"sha256:" + hashlib.sha256(key).hexdigest().encode()
    value_size = len(value) if value is not None else None
    body = {
        "stub": Code.OUTPUT_TOO_LARGE.value,
        "topic": topic, "partition": partition, "offset": offset, "timestamp": timestamp,
        "size": size, "limit": limit, "value_size": value_size,
        "value_sha256": hashlib.sha256(value).hexdigest() if value is not None else None,
        "headers_dropped": dropped,
    }
    why = Reason(Code.OUTPUT_TOO_LARGE, f"the record takes {size} bytes: with byzguard's headers its copy would not "
                 f"fit the {limit}-byte limit of its destination; the original is at {topic}[{partition}]@{offset}")
    out = quarantine_headers(kept, Outcome.QUARANTINED, [why, *reasons], route, topic=topic, partition=partition,
                             offset=offset, timestamp=timestamp, now=now)
    out.append((H_STUB, Code.OUTPUT_TOO_LARGE.value.encode()))
    return key, orjson.dumps(body), out
