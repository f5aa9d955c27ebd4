"""Last-known-good values for Python services: ask any byzguard worker for an entity's last verified value.

    from byzguard import NoVerifiedValue, get_last_known_good

    try:
        good = get_last_known_good("http://byzguard:6066", "prices", "sku-1")   # fail closed (default)
    except NoVerifiedValue:
        ...  # nothing verified to fall back to: refuse, never serve the suspect value
    price = good.value["price"]; stale = not good.fresh

byzguard only ever serves values that passed every check, so the one thing a caller decides is what to do
without one. Fail closed (the default, and the seed's rule for money, permissions and anything hard to
undo): no verified value raises NoVerifiedValue, and byzguard being unreachable raises
LastKnownGoodUnavailable. Fail open (`fail_closed=False`): both give None and the caller degrades.
`require_fresh=True` treats a value past its type's max_age (a fallback) as no value.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote


class LastKnownGoodError(Exception):
    """Root of the client's errors."""


class NoVerifiedValue(LastKnownGoodError, LookupError):
    """byzguard has no verified value to serve for the entity (never seen, expired, or not fresh enough)."""


class LastKnownGoodUnavailable(LastKnownGoodError):
    """byzguard did not answer (or answered something that is not a last-known-good response)."""


@dataclass(frozen=True, slots=True)
class LastKnownGood:
    """An entity's last verified value and how old it is."""

    route: str
    entity: str
    value: Any
    type: str
    version: int | None
    vclock: dict[str, int] | None
    verified_at: str
    event_time: str | None
    age_seconds: float
    max_age_seconds: float | None
    fresh: bool
    served_by: str

    @property
    def is_fallback(self) -> bool:
        """True when the value is older than its type's max_age: usable as a fallback only."""
        return not self.fresh


def url_for(base_url: str, route: str, entity: str) -> str:
    """The view's URL for an entity."""
    return f"{base_url.rstrip('/')}/entities/{quote(route, safe='')}/{quote(entity, safe='')}"


def parse_response(status: int, body: bytes, *, route: str, entity: str) -> LastKnownGood | None:
    """A response as a value (200), None (404: nothing verified), or LastKnownGoodUnavailable."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if status == 404 and isinstance(doc, dict) and doc.get("error") in ("not_found", "expired"):
        return None
    if status != 200 or not isinstance(doc, dict) or doc.get("status") not in ("fresh", "fallback"):
        detail = doc.get("detail") or doc.get("error") if isinstance(doc, dict) else body[:200]
        raise LastKnownGoodUnavailable(f"{route}/{entity}: HTTP {status}: {detail!r}")
    return LastKnownGood(route=doc["route"], entity=doc["entity"], value=doc.get("value"), type=doc["type"],
                         version=doc.get("version"), vclock=doc.get("vclock"), verified_at=doc["verified_at"],
                         event_time=doc.get("event_time"), age_seconds=float(doc["age_seconds"]),
                         max_age_seconds=doc.get("max_age_seconds"), fresh=bool(doc["fresh"]),
                         served_by=str(doc.get("served_by", "")))


def _decide(good: LastKnownGood | None, *, route: str, entity: str, fail_closed: bool,
            require_fresh: bool) -> LastKnownGood | None:
    if good is not None and require_fresh and not good.fresh:
        good = None
        why = "only a stale fallback value"
    else:
        why = "no verified value"
    if good is None and fail_closed:
        raise NoVerifiedValue(f"{route}/{entity}: {why}")
    return good


def get_last_known_good(base_url: str, route: str, entity: str, *, fail_closed: bool = True,
                        require_fresh: bool = False, timeout: float = 2.0) -> LastKnownGood | None:
    """The entity's last verified value from any worker at `base_url` (e.g. http://byzguard:6066).

    Fail closed (default): NoVerifiedValue when there is none, LastKnownGoodUnavailable when byzguard does
    not answer. Fail open: None in both cases. Never a value that did not pass verification.
    """
    try:
        try:
            with urllib.request.urlopen(url_for(base_url, route, entity), timeout=timeout) as resp:
                good = parse_response(resp.status, resp.read(), route=route, entity=entity)
        except urllib.error.HTTPError as exc:
            good = parse_response(exc.code, exc.read(), route=route, entity=entity)
    except (OSError, LastKnownGoodUnavailable) as exc:
        if fail_closed:
            raise exc if isinstance(exc, LastKnownGoodUnavailable) else LastKnownGoodUnavailable(
                f"{route}/{entity}: {exc}") from exc
        return None
    return _decide(good, route=route, entity=entity, fail_closed=fail_closed, require_fresh=require_fresh)


async def aget_last_known_good(base_url: str, route: str, entity: str, *, fail_closed: bool = True,
                               require_fresh: bool = False, timeout: float = 2.0) -> LastKnownGood | None:
    """get_last_known_good for asyncio services (aiohttp)."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session, \
                session.get(url_for(base_url, route, entity)) as resp:
            good = parse_response(resp.status, await resp.read(), route=route, entity=entity)
    except (aiohttp.ClientError, TimeoutError, LastKnownGoodUnavailable) as exc:
        if fail_closed:
            raise exc if isinstance(exc, LastKnownGoodUnavailable) else LastKnownGoodUnavailable(
                f"{route}/{entity}: {exc!r}") from exc
        return None
    return _decide(good, route=route, entity=entity, fail_closed=fail_closed, require_fresh=require_fresh)
