"""The last-known-good HTTP view: GET /entities/{route}/{entity} on any worker.

The entity state table (EntityState) holds each entity's last verified data; a quarantined event never
replaces it. The value lives in the worker that owns the entity's partition, so a request to any worker is
forwarded to the owner, as faust's `app.table_route` does; the partition comes from the entity id with Kafka's
default (murmur2) partitioner, which is how producers keyed by entity id place their records. The owner is found
from the batched runtime's own group assignment (app/runtime/owners.py, which also says which state the owner
reads there).

Asymmetric retention (the seed's asymmetric TTL): a value is *fresh* while its age (now - event time, or
verification time when the event had none) is within its type's `max_age`, then it is only a *fallback*,
and it is served as such until `last_good_retention` (far longer); after that it is not served (404).
"""

from __future__ import annotations

import base64
import logging
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from app import metrics
from app.runtime.owners import Located, read_entity
from byzguard.config import GuardConfig, Route
from byzguard.partitioner import partition_for
from byzguard.state import EntityState

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Byzguard-Forwarded-By"
SERVED_BY_HEADER = "X-Byzguard-Served-By"
FORWARD_TIMEOUT = 5.0

FRESH = "fresh"
FALLBACK = "fallback"
NOT_FOUND = "not_found"
EXPIRED = "expired"


def entity_partition(entity: str, partitions: int) -> int:
    """The partition of an entity id under Kafka's default (murmur2) partitioner."""
    return partition_for(entity.encode(), partitions)


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe_last_good(state: EntityState | None, *, route: Route, entity: str, retention: float,
                       now: float) -> tuple[str, dict[str, Any]]:
    """(outcome, JSON body) of a last-known-good lookup: fresh or fallback with the value, else not_found
    (nothing verified) or expired (older than the retention, so no longer served)."""
    base: dict[str, Any] = {"route": route.name, "entity": entity}
    if state is None:
        return NOT_FOUND, {**base, "error": NOT_FOUND, "detail": "no verified value for this entity"}
    if state.last_good_dropped:
        return NOT_FOUND, {**base, "error": NOT_FOUND, "verified_at": _iso(state.verified_at),
                           "detail": f"the last verified value ({state.last_good_dropped} bytes) was larger than "
                           f"last_good_max_bytes and was not kept"}
    since = state.event_time if state.event_time is not None else state.verified_at
    age = max(0.0, now - since)
    if age > retention:
        return EXPIRED, {**base, "error": EXPIRED, "detail": f"the last verified value is {age:.0f}s old, "
                         f"beyond last_good_retention ({retention:g}s)", "verified_at": _iso(state.verified_at)}
    max_age = route.policy_for(state.last_good_type).max_age
    fresh = max_age is None or age <= max_age
    body: dict[str, Any] = {
        **base,
        "status": FRESH if fresh else FALLBACK,
        "fresh": fresh,
        "type": state.last_good_type,
        "version": state.version,
        "vclock": state.vclock.to_dict() if state.vclock is not None else None,
        "verified_at": _iso(state.verified_at),
        "event_time": _iso(state.event_time),
        "age_seconds": round(age, 3),
        "max_age_seconds": max_age,
        "retention_seconds": retention,
        "served_until": _iso(since + retention),
    }
    try:
        body["value"] = orjson.loads(state.last_good)
        orjson.dumps(body["value"])  # orjson reads 1,024 levels but writes 254: a deeper value cannot be answered
    except orjson.JSONDecodeError:  # a binary-mode producer may send non-JSON bytes
        body["value"] = None
        body["value_base64"] = base64.b64encode(state.last_good).decode()
    except orjson.JSONEncodeError:  # the exact bytes instead of a value cut short
        body["value"] = None
        body["value_base64"] = base64.b64encode(state.last_good).decode()
        body["value_note"] = "the value is nested too deeply to be answered as JSON: its bytes are in value_base64"
    return body["status"], body


def register_entity_views(built: Any, config: GuardConfig) -> None:
    """Add GET /entities/{route}/{entity} to a built worker app (app.worker.GuardApp)."""
    import time

    app = built.app
    routes = {r.name: r for r in config.routes}
    retention = config.last_good_retention

    def locate(spec: Route, partition: int, entity: str) -> Located:
        """Where the entity's state is: read here, on another worker, or unavailable now (app/runtime/owners.py)."""
        if built.runtime is None or built.owners is None:
            return Located("unavailable", detail="the batched runtime has not started yet")
        return read_entity(built.runtime, built.owners, spec, partition, entity.encode())

    async def forward(view: Any, request: Any, owner: URL, path: str) -> Any:
        target = owner.with_path(path, encoded=True).with_query(request.query)
        try:
            async with app.http_client.get(target, headers={FORWARDED_HEADER: str(app.conf.canonical_url)},
                                           timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)) as resp:
                body = await resp.read()
                headers = {SERVED_BY_HEADER: resp.headers.get(SERVED_BY_HEADER, str(owner))}
                if "Retry-After" in resp.headers:  # the owner is restoring the partition: when to ask again
                    headers["Retry-After"] = resp.headers["Retry-After"]
                return view.bytes(body, content_type=resp.content_type, status=resp.status, headers=headers)
        except Exception as exc:  # the owner is down or restarting: say so, never guess a value
            log.warning("last-known-good: owner %s did not answer: %r", owner, exc)
            return view.json({"error": "unavailable", "detail": f"the owner {owner} did not answer"},
                             status=503, headers={"Retry-After": "1"})

    @app.page("/entities/{route}/{entity:.+}")  # type: ignore[untyped-decorator]  # faust's App.page is untyped
    async def last_known_good(view: Any, request: Any, route: str, entity: str) -> Any:
        """The last verified value of an entity, answered by the worker that owns it."""
        spec = routes.get(route)
        if spec is None:
            return view.json({"error": "unknown_route", "route": route, "routes": sorted(routes)}, status=404)
        partition = entity_partition(entity, spec.partitions)
        located = locate(spec, partition, entity)
        if located.where == "unavailable":
            return view.json({"error": "unavailable", "detail": located.detail}, status=503,
                             headers={"Retry-After": "1"})
        if located.where == "elsewhere":
            assert located.owner is not None
            if request.headers.get(FORWARDED_HEADER):  # ownership moved under a forwarded request: no loops
                return view.json({"error": "unavailable", "detail": "the partition is moving between workers"},
                                 status=503, headers={"Retry-After": "1"})
            return await forward(view, request, URL(located.owner),
                                 f"/entities/{quote(route, safe='')}/{quote(entity, safe='')}")
        raw = located.raw
        state = EntityState.from_bytes(raw) if raw else None
        outcome, body = describe_last_good(state, route=spec, entity=entity, retention=retention, now=time.time())
        body["partition"] = partition
        body["served_by"] = str(app.conf.canonical_url)
        metrics.LAST_GOOD_REQUESTS.labels(route, outcome).inc()
        if outcome == FALLBACK:
            metrics.LAST_GOOD_SERVED.labels(route, metrics.type_label(route, body["type"])).inc()
        status = 200 if outcome in (FRESH, FALLBACK) else 404
        return view.json(body, status=status, headers={SERVED_BY_HEADER: str(app.conf.canonical_url)})
