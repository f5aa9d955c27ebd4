"""The review page and JSON API, served by every worker's faust web server.

    GET  /review/                              the page (static HTML + JS; it holds no data itself)
    GET  /review/api/records?status=&reason=&source=&type=&entity=&route=&since=&until=&limit=&offset=
    GET  /review/api/records/{qid}             detail, with the entity's last-known-good value
    POST /review/api/records/{qid}/{action}    approve | reject | recheck   body {"note": "...", "replay": true}
    POST /review/api/bulk                      {"action", "note", "filter": {...}, "expected": n}
    POST /review/api/replay                    {"ids": [...]} or {} for every approved record

Writes need `Authorization: Bearer <token>` (or Basic reviewer:token): a per-reviewer token from
BYZGUARD_REVIEW_TOKENS names the reviewer; the shared BYZGUARD_REVIEW_TOKEN needs the reviewer's name in
X-Byzguard-Reviewer. Reads need the same unless BYZGUARD_REVIEW_OPEN_READS=true. Every action is recorded in
the decisions topic by app.review.store.ReviewStore.
"""

from __future__ import annotations

import dataclasses
import logging
from importlib import resources
from typing import TYPE_CHECKING, Any

from mode import Service

from app.review.store import MAX_WINDOW, ActionReport, ReviewStore
from byzguard.errors import ConfigError, InfrastructureError
from byzguard.guard import ENTITIES
from byzguard.review import (
    REVIEW_ACTIONS,
    Action,
    BadFilterError,
    NotAuthenticatedError,
    ReviewFilter,
    authenticate,
    clean_note,
    entity_view,
    item_detail,
    parse_token_map,
)

if TYPE_CHECKING:
    from app.settings import Settings
    from app.worker import GuardApp

log = logging.getLogger(__name__)

PAGE_PATH = "/review/"
API = "/review/api"
DEFAULT_LIMIT = 500
MAX_LIMIT = 1_000
MAX_IDS = 10_000
AUTH_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="byzguard-review"'}


def page_html() -> str:
    """The review page, shipped as package data."""
    return resources.files("app.review").joinpath("review.html").read_text(encoding="utf-8")


class ReviewWeb:
    """What the review views need: the store, the credentials and the worker's tables."""

    def __init__(self, built: GuardApp, settings: Settings, store: ReviewStore) -> None:
        self.built = built
        self.store = store
        self.shared_token = settings.review_token.get_secret_value() if settings.review_token else None
        try:
            self.named_tokens = parse_token_map(
                settings.review_tokens.get_secret_value() if settings.review_tokens else None)
        except ValueError as exc:
            raise ConfigError(f"BYZGUARD_REVIEW_TOKENS: {exc}") from None
        self.open_reads = settings.review_open_reads
        self.runner = f"worker:{settings.app_id}@{settings.web_host}:{settings.web_port}"
        self.app_id = settings.app_id

    def reviewer(self, request: Any, *, require_name: bool = True) -> str:
        """The authenticated reviewer of a request, or NotAuthenticatedError."""
        return authenticate(request.headers.get("Authorization"),
                            claimed_reviewer=request.headers.get("X-Byzguard-Reviewer"),
                            shared_token=self.shared_token, named_tokens=self.named_tokens,
                            require_name=require_name)

    def may_read(self, request: Any) -> None:
        """Raise NotAuthenticatedError unless reads are open or the request carries a valid token."""
        if not self.open_reads:
            self.reviewer(request, require_name=False)

    def entity(self, route_name: str, entity: str, partition: int) -> dict[str, Any]:
        """The entity's state if this worker owns its partition; otherwise where it lives (app/runtime/owners.py)."""
        from app.runtime.owners import read_entity
        from app.runtime.state import changelog_topic
        from tables import Table, table_name

        route = next((r for r in self.built.guard.config.routes if r.name == route_name), None)
        if route is None:
            return {"where": "unknown", "detail": f"route {route_name!r} is not run by this worker"}
        where = {"partition": partition, "changelog": changelog_topic(self.app_id, route, ENTITIES),
                 "table": table_name(route, Table.STATE_BY_ENTITY)}
        owners, runtime = self.built.owners, self.built.runtime
        assert owners is not None
        if runtime is None:
            return {"where": "unknown", **where, "state": None, "detail": "the batched runtime has not started yet"}
        located = read_entity(runtime, owners, route, partition, entity.encode())
        if located.where == "here":
            return {"where": "here", **where, "state": entity_view(located.raw),
                    "detail": "no verified version yet" if located.raw is None else ""}
        if located.where == "elsewhere":
            return {"where": "elsewhere", **where, "workers": [located.owner], "state": None,
                    "detail": f"partition {partition} of {where['changelog']} is owned by {located.owner}; ask "
                    "that worker's review page"}
        return {"where": "unknown", **where, "state": None, "detail": f"not readable now: {located.detail}"}


def _number(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within [low, high]; BadFilterError (400) naming it otherwise."""
    raw = query.get(name)
    if raw in (None, ""):
        return max(low, min(default, high))
    try:
        value = int(raw)
    except ValueError:
        raise BadFilterError(f"{name} must be an integer, not {raw[:50]!r}") from None
    if not low <= value <= high:
        raise BadFilterError(f"{name} must be between {low} and {high}")
    return value


def _ids(body: dict[str, Any]) -> frozenset[str] | None:
    """The body's "ids": a list of quarantine id strings, or absent; BadFilterError (400) otherwise."""
    ids = body.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise BadFilterError("ids must be a list of quarantine id strings")
    if len(ids) > MAX_IDS:
        raise BadFilterError(f"at most {MAX_IDS} ids per request; use a filter for more")
    return frozenset(ids) or None


def _note(body: dict[str, Any]) -> str:
    note = body.get("note")
    if note is not None and not isinstance(note, str):
        raise BadFilterError("note must be a string")
    return clean_note(note)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, True)
    if not isinstance(value, bool):
        raise BadFilterError(f"{name} must be true or false")
    return value


def _report_status(report: ActionReport) -> int:
    return 409 if report.refused and not report.applied and not report.unchanged else 200


def register_review(built: GuardApp, settings: Settings, bootstrap: str) -> ReviewWeb:
    """Register the review page, the JSON API and the review store's lifecycle on the worker's app."""
    from aiohttp.web import HTTPFound
    from faust.web import View

    app = built.app
    store = ReviewStore(bootstrap, built.guard.config, app_id=settings.app_id,
                        decisions_topic=settings.decisions_topic, client_id=f"{settings.app_id}-review")
    review = ReviewWeb(built, settings, store)
    default_types = store.default_types

    class ReviewService(Service):
        """Stops the review store with the worker (it starts on the first review request, not before: a worker
        nobody reviews on pays nothing for it)."""

        async def on_stop(self) -> None:
            await store.stop()

    app.service(ReviewService)

    class _ReviewView(View):
        def problem(self, status: int, message: str, **extra: Any) -> Any:
            headers = dict(AUTH_CHALLENGE) if status == 401 else None
            return self.error(status, message, headers=headers, **extra)

        async def guarded(self, request: Any, handler: Any) -> Any:
            try:
                return await handler()
            except NotAuthenticatedError as exc:
                return self.problem(401, str(exc))
            except BadFilterError as exc:
                return self.problem(400, str(exc))
            except InfrastructureError as exc:
                return self.problem(503, str(exc))

        async def body(self, request: Any) -> dict[str, Any]:
            if not request.can_read_body:
                return {}
            try:
                data = await request.json()
            except (ValueError, RecursionError):
                raise BadFilterError("the body is not JSON (or nested too deeply)") from None
            if not isinstance(data, dict):
                raise BadFilterError("the body must be a JSON object")
            return data

    @app.page(PAGE_PATH, name="review_page")
    class ReviewPage(_ReviewView):
        async def get(self, request: Any) -> Any:
            return self.html(page_html(), headers={"Cache-Control": "no-store"})

    @app.page(PAGE_PATH.rstrip("/"), name="review_page_redirect")
    class ReviewRedirect(_ReviewView):
        async def get(self, request: Any) -> Any:
            raise HTTPFound(PAGE_PATH)

    @app.page(f"{API}/records", name="review_records")
    class Records(_ReviewView):
        async def get(self, request: Any) -> Any:
            async def handle() -> Any:
                review.may_read(request)
                query = dict(request.query)
                selected = ReviewFilter.from_mapping(query)
                limit = _number(query, "limit", DEFAULT_LIMIT, 0, MAX_LIMIT)
                offset = _number(query, "offset", 0, 0, MAX_WINDOW - limit)
                page = await store.page(selected, offset=offset, limit=limit)
                return self.json({"total": page.total, "offset": page.offset, "limit": page.limit,
                                  "records": page.records, "counts": page.counts, "filter": selected.as_dict(),
                                  "routes": sorted(store.routes)})
            return await self.guarded(request, handle)

    @app.page(API + "/records/{qid}", name="review_record")
    class Record(_ReviewView):
        async def get(self, request: Any, qid: str) -> Any:
            async def handle() -> Any:
                review.may_read(request)
                item = await store.find(qid)
                if item is None:
                    return self.problem(404, f"no quarantined record {qid!r}")
                rec = item.record
                detail = item_detail(item, default_types.get(rec.route, ""))
                detail["entity_state"] = review.entity(rec.route, rec.entity, rec.original_partition)
                return self.json(detail)
            return await self.guarded(request, handle)

    @app.page(API + "/records/{qid}/{action}", name="review_action")
    class RecordAction(_ReviewView):
        async def post(self, request: Any, qid: str, action: str) -> Any:
            async def handle() -> Any:
                reviewer = review.reviewer(request)
                try:
                    chosen = Action(action)
                except ValueError:
                    chosen = None
                if chosen not in REVIEW_ACTIONS:
                    return self.problem(404, f"unknown action {action!r}; use approve, reject or recheck")
                assert chosen is not None
                body = await self.body(request)
                note, replay = _note(body), _flag(body, "replay")
                report = await store.decide(ReviewFilter(ids=frozenset({qid})), chosen, reviewer=reviewer, note=note)
                result = report.as_dict()
                if chosen is Action.APPROVE and replay and not report.refused:
                    replayed = await store.replay(ReviewFilter(ids=frozenset({qid})), runner=review.runner)
                    result["replay"] = replayed.as_dict()
                return self.json(result, status=_report_status(report))
            return await self.guarded(request, handle)

    @app.page(f"{API}/bulk", name="review_bulk")
    class Bulk(_ReviewView):
        async def post(self, request: Any) -> Any:
            async def handle() -> Any:
                reviewer = review.reviewer(request)
                body = await self.body(request)
                try:
                    chosen = Action(str(body.get("action", "")))
                except ValueError:
                    chosen = None
                if chosen not in REVIEW_ACTIONS:
                    return self.problem(400, "action must be approve, reject or recheck")
                assert chosen is not None
                raw_filter = body.get("filter")
                if raw_filter is not None and not isinstance(raw_filter, dict):
                    raise BadFilterError("filter must be a JSON object (may be {} for everything)")
                ids = _ids(body)
                if raw_filter is None and not ids:
                    return self.problem(400, "give a filter object (may be {} for everything) or ids")
                for name, value in (raw_filter or {}).items():
                    if name not in ReviewFilter.FIELDS:
                        raise BadFilterError(f"unknown filter field {name!r}; known: {', '.join(ReviewFilter.FIELDS)}")
                    if value is not None and not isinstance(value, (str, int, float)):
                        raise BadFilterError(f"filter field {name!r} must be a string")
                query = {k: str(v) for k, v in (raw_filter or {}).items() if v not in (None, "")}
                selected = ReviewFilter.from_mapping(query)
                if ids:
                    selected = dataclasses.replace(selected, ids=ids)
                expected = body.get("expected")
                if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)
                                             or expected < 0):
                    raise BadFilterError("expected must be the number of records shown (an integer >= 0)")
                note, replay = _note(body), _flag(body, "replay")
                if expected is not None:
                    now_matching = (await store.page(selected, limit=0)).total
                    if now_matching != expected:
                        return self.problem(409, f"the filtered set changed: {now_matching} records match now, "
                                            f"{expected} were shown; reload and confirm again",
                                            matching=now_matching)
                report = await store.decide(selected, chosen, reviewer=reviewer, note=note)
                result = report.as_dict()
                approved = [*report.applied, *(q for q, _ in report.unchanged)]
                if chosen is Action.APPROVE and replay and approved:
                    replayed = await store.replay(ReviewFilter(ids=frozenset(approved)), runner=review.runner)
                    result["replay"] = replayed.as_dict()
                return self.json(result, status=_report_status(report))
            return await self.guarded(request, handle)

    @app.page(f"{API}/replay", name="review_replay")
    class Replay(_ReviewView):
        async def post(self, request: Any) -> Any:
            async def handle() -> Any:
                review.reviewer(request)
                body = await self.body(request)
                ids = _ids(body)
                selected = ReviewFilter(ids=ids) if ids else None
                report = await store.replay(selected, runner=review.runner)
                return self.json(report.as_dict())
            return await self.guarded(request, handle)

    return review
