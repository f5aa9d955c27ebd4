"""Headers byzguard adds to forwarded and quarantined records. Original headers are kept; ours replace,
never append, so a record that passes through twice does not grow."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import orjson

from byzguard.verdict import Outcome, Reason

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


def encode_reasons(reasons: Sequence[Reason]) -> bytes:
    """The reasons as a JSON list of {check, code, severity, detail}."""
    return orjson.dumps([r.as_dict() for r in reasons])


def decode_reasons(raw: bytes) -> list[dict[str, str]]:
    """Inverse of encode_reasons, for the review tools."""
    out: list[dict[str, str]] = orjson.loads(raw)
    return out


def quarantine_id(topic: str, partition: int, offset: int) -> str:
    """A stable id for a quarantined record: its coordinates, so a redelivered record keeps its id."""
    return f"{topic}-{partition}-{offset}"


def verified_headers(
    headers: Iterable[tuple[str, bytes]] | None, outcome: Outcome, reasons: Sequence[Reason], route: str,
    now: float,
) -> Headers:
    """Original headers plus the verdict (pass, warn or suspect) and any reasons."""
    out = original_headers(headers)
    out.append((H_VERDICT, _VERDICT_OF[outcome]))
    out.append((H_ROUTE, route.encode()))
    out.append((H_VERIFIED_AT, f"{now:.6f}".encode()))
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
    return orjson.dumps({"id": event_id, "outcome": outcome.value, "route": route,
                         "reasons": [r.as_dict() for r in reasons], "topic": topic, "partition": partition,
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
            try:
                topic, partition, offset, timestamp = orjson.loads(raw)
            except (orjson.JSONDecodeError, TypeError, ValueError):
                return None
            return str(topic), int(partition), int(offset), None if timestamp is None else float(timestamp)
    return None
