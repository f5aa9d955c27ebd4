"""`byzguard quarantine`: review quarantined records from a terminal, talking to Kafka directly.

No worker is needed: the state is read from the quarantine and decisions topics, and decisions are written
the same way the workers' review API writes them (app.review.store), so both see the same thing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table

from app.sidereads import started_side_consumer, topic_partitions
from byzguard.errors import ByzguardError, ConfigError
from byzguard.review import (
    Action,
    BadFilterError,
    ReviewFilter,
    clean_note,
    clean_reviewer,
    entity_view,
    item_detail,
)

T = TypeVar("T")

quarantine_cli = typer.Typer(
    help="Review quarantined records: list, show, approve, reject, recheck, replay (talks to Kafka directly).",
    no_args_is_help=True, add_completion=False)
out = Console()
err = Console(stderr=True)

EXIT_REFUSED = 1
EXIT_SETUP = 2
EXIT_NOT_FOUND = 3

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="routes file (default BYZGUARD_CONFIG)")]
BrokerOpt = Annotated[str | None, typer.Option("--broker", help="bootstrap servers (default BYZGUARD_BROKER)")]
StatusOpt = Annotated[str | None, typer.Option("--status", help="pending, approved, rejected, replayed, rechecked "
                                                               "(comma-separated)")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="reason code or family (version, version.gap)")]
SourceOpt = Annotated[str | None, typer.Option("--source", help="producing service (ce_source)")]
TypeOpt = Annotated[str | None, typer.Option("--type", help="event type (ce_type)")]
EntityOpt = Annotated[str | None, typer.Option("--entity", help="entity id (record key / ce_subject)")]
RouteOpt = Annotated[str | None, typer.Option("--route", help="route name")]
SinceOpt = Annotated[str | None, typer.Option("--since", help="quarantined at or after (ISO-8601 or epoch s)")]
UntilOpt = Annotated[str | None, typer.Option("--until", help="quarantined before (ISO-8601 or epoch s)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]
IdsArg = Annotated[list[str] | None, typer.Argument(help="quarantine ids (<topic>-<partition>-<offset>)")]
AllOpt = Annotated[bool, typer.Option("--all-matching", help="act on every record matching the filters")]
NoteOpt = Annotated[str, typer.Option("--note", "-m", help="why (recorded with the decision)")]
ReviewerOpt = Annotated[str | None, typer.Option("--reviewer", help="who decides (default BYZGUARD_REVIEWER or "
                                                                    "the login name)")]


def _filter(ids: list[str] | None = None, **fields: str | None) -> ReviewFilter:
    try:
        selected = ReviewFilter.from_mapping(fields)
    except BadFilterError as exc:
        err.print(f"[bold red]bad filter[/]: {_safe(exc)}")
        raise typer.Exit(EXIT_SETUP) from None
    return dataclasses.replace(selected, ids=frozenset(ids)) if ids else selected


def _store(config: Path | None, broker: str | None) -> Any:
    """A ReviewStore for the deployment the settings (and these overrides) describe."""
    from app.review.store import ReviewStore
    from app.settings import settings_or_exit
    from byzguard import config as guard_config

    settings = settings_or_exit({"config": config, "broker": broker},
                                option_names={"config": "--config", "broker": "--broker"})
    try:
        cfg = guard_config.load(settings.config, require_secrets=False)  # reviewing verifies no MAC
    except ConfigError as exc:
        err.print(f"[bold red]configuration refused[/]: {_safe(exc, lines=True)}")
        raise typer.Exit(EXIT_SETUP) from None
    bootstrap = settings.broker
    if not bootstrap:
        from app.settings import running_local_broker

        bootstrap = running_local_broker()
    if not bootstrap:
        err.print("[bold red]no broker[/]: set BYZGUARD_BROKER (or --broker), or start the local one with "
                  "`make broker-start`")
        raise typer.Exit(EXIT_SETUP)
    return ReviewStore(bootstrap, cfg, app_id=settings.app_id, decisions_topic=settings.decisions_topic,
                       client_id=f"{settings.app_id}-review-cli")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)


async def _loaded(store: Any, progress: Progress) -> None:
    task = progress.add_task("reading the decisions", total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    await store.start()
    await store.refresh(update)  # the decisions; records are read by the command itself
    progress.update(task, completed=progress.tasks[task].total or 0, total=progress.tasks[task].total or 0)


def _run(store: Any, work: Callable[[Any, Progress], Awaitable[T]]) -> T:
    """Start the store, run `work`, stop; broker trouble becomes a clean exit 2."""

    async def main() -> T:
        try:
            with _progress() as progress:
                await _loaded(store, progress)
                return await work(store, progress)
        finally:
            await store.stop()

    try:
        return asyncio.run(main())
    except ByzguardError as exc:
        err.print(f"[bold red]failed[/]: {_safe(exc, lines=True)}")
        raise typer.Exit(EXIT_SETUP) from None


# Whatever a record carries reaches the terminal only as visible text: control characters (C0, DEL, C1: screen
# clears, window titles, cursor moves) and bidirectional overrides are shown as escapes, and rich markup in a
# value is escaped, so `[/x]` prints as `[/x]` instead of failing.
_UNSAFE = [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_CELL = {cp: f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}" for cp in _UNSAFE}
# orjson escapes C0 inside strings itself (a raw newline in its output is layout); it leaves DEL, C1 and bidi as is.
_IN_JSON = {cp: f"\\u{cp:04x}" for cp in _UNSAFE if cp >= 0x7F}
_LINES = {cp: text for cp, text in _CELL.items() if cp != 0x0A}


def _safe(value: object, *, lines: bool = False) -> str:
    """A value as visible text for a table cell or a markup string (one line unless `lines`)."""
    return escape(str(value).translate(_LINES if lines else _CELL))


def _json_text(value: Any, *, indent: bool = False) -> str:
    """JSON text of a value with every control and bidi character escaped (the value is bounded already)."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 if indent else 0).decode().translate(_IN_JSON)


def _print_json(value: Any) -> None:
    out.file.write(_json_text(value, indent=True) + "\n")  # as is: rich would wrap long lines inside strings


def _when(epoch: float | None) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S") if epoch else ""


_STATUS_STYLE = {"pending": "yellow", "approved": "green", "replayed": "bold green", "rejected": "red",
                 "rechecked": "magenta"}


@quarantine_cli.command("list")
def list_records(
    config: ConfigOpt = None, broker: BrokerOpt = None, status: StatusOpt = None, reason: ReasonOpt = None,
    source: SourceOpt = None, type: TypeOpt = None, entity: EntityOpt = None, route: RouteOpt = None,
    since: SinceOpt = None, until: UntilOpt = None,
    limit: Annotated[int, typer.Option(help="rows to print", min=0, max=1000)] = 100,
    offset: Annotated[int, typer.Option(help="skip this many of the newest matching records first", min=0)] = 0,
    as_json: JsonOpt = False,
) -> None:
    """List quarantined records (newest first) with their review status, and counts by reason and status."""
    from app.review.store import MAX_WINDOW

    selected = _filter(status=status, reason=reason, source=source, type=type, entity=entity, route=route,
                       since=since, until=until)
    if offset + limit > MAX_WINDOW:
        err.print(f"[bold red]bad paging[/]: --offset + --limit may be at most {MAX_WINDOW}; narrow the filters")
        raise typer.Exit(EXIT_SETUP)

    async def work(store: Any, progress: Progress) -> Any:
        task = progress.add_task("reading the quarantine", total=None)
        return await store.page(selected, offset=offset, limit=limit,
                                progress=lambda d, t: progress.update(task, completed=d, total=t))

    page = _run(_store(config, broker), work)
    if as_json:
        _print_json({"total": page.total, "offset": page.offset, "records": page.records, "counts": page.counts})
        return
    print_page(page)


def print_page(page: Any) -> None:
    """A page of the quarantine (app.review.store.Page) as tables: records, then counts by reason and status."""
    offset, tally = page.offset, page.counts
    shown = f" (showing {offset + 1}-{offset + len(page.records)})" if page.records and (
        offset or len(page.records) < page.total) else ""
    table = Table(title=f"quarantine: {page.total} matching{shown}")
    for column in ("quarantine id", "status", "route", "type", "source", "entity", "reasons", "detected (UTC)",
                   "last decision"):
        table.add_column(column, overflow="fold")
    for row in page.records:
        latest = row["last_decision"]
        table.add_row(_safe(row["quarantine_id"]), f"[{_STATUS_STYLE[row['status']]}]{row['status']}[/]",
                      _safe(row["route"]), _safe(row["type"]), _safe(row["source"]), _safe(row["entity"]),
                      _safe(", ".join(row["codes"])), _when(row["detected_at"] or row["original"]["timestamp"]),
                      _safe(f"{latest['action']} by {latest['reviewer']}") if latest else "")
    out.print(table)
    by_reason = Table(title="by reason")
    by_reason.add_column("reason code")
    by_reason.add_column("records", justify="right")
    for code, n in tally["reason"].items():
        by_reason.add_row(_safe(code), str(n))
    by_status = Table(title="by status")
    by_status.add_column("status")
    by_status.add_column("records", justify="right")
    for name, n in tally["status"].items():
        by_status.add_row(_safe(name), str(n))
    out.print(by_reason, by_status)


async def _entity_state(store: Any, route_name: str, entity: str, partition: int) -> dict[str, Any]:
    """The entity's last-known-good value, read from the state table's changelog partition (read_committed)."""
    from aiokafka import TopicPartition

    changelog = f"{store.app_id}-{route_name}-state_by_entity-changelog"
    where: dict[str, Any] = {"where": "changelog", "changelog": changelog, "partition": partition}
    consumer = await started_side_consumer(store.bootstrap)
    try:
        tp = TopicPartition(changelog, partition)
        if tp not in await topic_partitions(consumer, [changelog]):
            return {**where, "state": None, "detail": "no such changelog partition (has a worker run?)"}
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        key, raw = entity.encode(), None
        while await consumer.position(tp) < end:
            for rec in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                if rec.key == key:
                    raw = rec.value
        return {**where, "state": entity_view(raw), "detail": "" if raw else "no verified version yet"}
    finally:
        await consumer.stop()


@quarantine_cli.command("show")
def show(
    quarantine_id: Annotated[str, typer.Argument(help="the quarantine id")],
    config: ConfigOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False,
    entity_state: Annotated[bool, typer.Option(help="read the entity's last-known-good value from its "
                                                    "state changelog")] = True,
) -> None:
    """Show one record: decoded data, headers, reasons, coordinates, decisions and the entity's last good value."""

    async def work(store: Any, progress: Progress) -> dict[str, Any] | None:
        task = progress.add_task("looking for the record", total=None)
        item = await store.find(quarantine_id)
        progress.update(task, completed=1, total=1)
        if item is None:
            return None
        rec = item.record
        detail = item_detail(item, store.default_types.get(rec.route, ""))
        if entity_state:
            detail["entity_state"] = await _entity_state(store, rec.route, rec.entity, rec.original_partition)
        return detail

    detail = _run(_store(config, broker), work)
    if detail is None:
        err.print(f"[bold red]not found[/]: no quarantined record {_safe(repr(quarantine_id))}")
        raise typer.Exit(EXIT_NOT_FOUND)
    if as_json:
        _print_json(detail)
        return
    print_detail(detail)


def print_detail(detail: dict[str, Any]) -> None:
    """One record's detail (byzguard.review.item_detail, bounded) as panels and tables, every value escaped."""
    links = " · ".join(x for x in (f"recheck of {_safe(detail['recheck_of'])}" if detail["recheck_of"] else "",
                                   f"re-sent as {_safe(detail['rechecked_as'])}" if detail["rechecked_as"] else "")
                       if x)
    out.print(Panel(f"[bold]{_safe(detail['quarantine_id'])}[/]  status [{_STATUS_STYLE[detail['status']]}]"
                    f"{detail['status']}[/]  route {_safe(detail['route'])}  type {_safe(detail['type'])}  source "
                    f"{_safe(detail['source'])}  entity {_safe(detail['entity'])}\n{links}",
                    title="quarantined record"))
    reasons = Table(title="reasons")
    for column in ("code", "severity", "detail"):
        reasons.add_column(column, overflow="fold")
    for reason in detail["reasons"]:
        reasons.add_row(*(_safe(reason.get(name, "")) for name in ("code", "severity", "detail")))
    out.print(reasons)
    out.print(Panel(Syntax(_json_text(detail["data"], indent=True), "json", word_wrap=True), title="this record"))
    state = detail.get("entity_state")
    if state is not None:
        body = (Syntax(_json_text(state["state"], indent=True), "json", word_wrap=True) if state.get("state")
                else _safe(state.get("detail", "")))
        out.print(Panel(body, title=f"last known good (partition {state['partition']} of "
                                    f"{_safe(state['changelog'])})"))
    coordinates = Table(title="coordinates")
    for column in ("", "topic", "partition", "offset", "timestamp"):
        coordinates.add_column(column)
    for name in ("original", "quarantine"):
        c = detail[name]
        coordinates.add_row(name, _safe(c["topic"]), str(c["partition"]), str(c.get("offset", "")),
                            _when(c["timestamp"]))
    out.print(coordinates)
    headers = Table(title="headers")
    headers.add_column("name")
    headers.add_column("value", overflow="fold")
    for name, value in detail["headers"]:
        headers.add_row(_safe(name), _safe(value))
    out.print(headers)
    history = Table(title="decisions")
    for column in ("time (UTC)", "action", "reviewer", "note", "target"):
        history.add_column(column, overflow="fold")
    for entry in detail["history"]:
        history.add_row(_when(entry["at"]), *(_safe(entry[name]) for name in ("action", "reviewer", "note", "target")))
    out.print(history)


def _print_report(report: Any, as_json: bool) -> None:
    data = report.as_dict()
    if as_json:
        _print_json(data)
    else:
        table = Table(title=f"{report.action}: {len(report.applied)} done, {len(report.unchanged)} unchanged, "
                            f"{len(report.refused)} refused")
        table.add_column("quarantine id")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        delivered = dict(report.delivered)
        for qid in report.applied:
            table.add_row(_safe(qid), "[green]done[/]", _safe(f"-> {delivered[qid]}") if qid in delivered else "")
        for qid, why in report.unchanged:
            table.add_row(_safe(qid), "unchanged", _safe(why))
        for qid, why in report.refused:
            table.add_row(_safe(qid), "[red]refused[/]", _safe(why))
        out.print(table)


def _decide(action: Action, ids: list[str] | None, all_matching: bool, note: str, reviewer: str | None,
            config: Path | None, broker: str | None, fields: dict[str, str | None], as_json: bool,
            replay: bool = False) -> None:
    if not ids and not all_matching:
        err.print("[bold red]nothing selected[/]: give quarantine ids, or filters with --all-matching")
        raise typer.Exit(EXIT_SETUP)
    who = clean_reviewer(reviewer or os.environ.get("BYZGUARD_REVIEWER") or getpass.getuser())
    selected = _filter(ids, **fields)

    async def work(store: Any, progress: Progress) -> Any:
        task = progress.add_task(f"{action.value}", total=None)
        report = await store.decide(selected, action, reviewer=f"cli:{who}", note=clean_note(note),
                                    progress=lambda d, t: progress.update(task, completed=d, total=t))
        if replay and report.applied:
            task = progress.add_task("replay", total=len(report.applied))
            replayed = await store.replay(ReviewFilter(ids=frozenset(report.applied)), runner=f"cli:{who}",
                                          progress=lambda d, t: progress.update(task, completed=d, total=t))
            report.delivered.extend(replayed.delivered)
        return report

    report = _run(_store(config, broker), work)
    _print_report(report, as_json)
    if report.refused:
        raise typer.Exit(EXIT_REFUSED)


@quarantine_cli.command("approve")
def approve(
    ids: IdsArg = None, all_matching: AllOpt = False, note: NoteOpt = "", reviewer: ReviewerOpt = None,
    replay: Annotated[bool, typer.Option(help="deliver the approved records to the verified topic now")] = True,
    config: ConfigOpt = None, broker: BrokerOpt = None, status: StatusOpt = None, reason: ReasonOpt = None,
    source: SourceOpt = None, type: TypeOpt = None, entity: EntityOpt = None, route: RouteOpt = None,
    since: SinceOpt = None, until: UntilOpt = None, as_json: JsonOpt = False,
) -> None:
    """Approve records (and, unless --no-replay, deliver them to the verified topic exactly once)."""
    _decide(Action.APPROVE, ids, all_matching, note, reviewer, config, broker,
            {"status": status, "reason": reason, "source": source, "type": type, "entity": entity, "route": route,
             "since": since, "until": until}, as_json, replay=replay)


@quarantine_cli.command("reject")
def reject(
    ids: IdsArg = None, all_matching: AllOpt = False, note: NoteOpt = "", reviewer: ReviewerOpt = None,
    config: ConfigOpt = None, broker: BrokerOpt = None, status: StatusOpt = None, reason: ReasonOpt = None,
    source: SourceOpt = None, type: TypeOpt = None, entity: EntityOpt = None, route: RouteOpt = None,
    since: SinceOpt = None, until: UntilOpt = None, as_json: JsonOpt = False,
) -> None:
    """Reject records: they are never delivered (a reviewer may still approve them before any replay)."""
    _decide(Action.REJECT, ids, all_matching, note, reviewer, config, broker,
            {"status": status, "reason": reason, "source": source, "type": type, "entity": entity, "route": route,
             "since": since, "until": until}, as_json)


@quarantine_cli.command("recheck")
def recheck(
    ids: IdsArg = None, all_matching: AllOpt = False, note: NoteOpt = "", reviewer: ReviewerOpt = None,
    config: ConfigOpt = None, broker: BrokerOpt = None, status: StatusOpt = None, reason: ReasonOpt = None,
    source: SourceOpt = None, type: TypeOpt = None, entity: EntityOpt = None, route: RouteOpt = None,
    since: SinceOpt = None, until: UntilOpt = None, as_json: JsonOpt = False,
) -> None:
    """Send the original records through every check again (re-sent to their input topic; a running worker decides)."""
    _decide(Action.RECHECK, ids, all_matching, note, reviewer, config, broker,
            {"status": status, "reason": reason, "source": source, "type": type, "entity": entity, "route": route,
             "since": since, "until": until}, as_json)


@quarantine_cli.command("replay")
def replay(
    ids: IdsArg = None, reviewer: ReviewerOpt = None,
    rate: Annotated[float | None, typer.Option(help="at most this many records per second")] = None,
    batch_size: Annotated[int, typer.Option(help="records per Kafka transaction", min=1)] = 50,
    config: ConfigOpt = None, broker: BrokerOpt = None, reason: ReasonOpt = None, source: SourceOpt = None,
    type: TypeOpt = None, entity: EntityOpt = None, route: RouteOpt = None, since: SinceOpt = None,
    until: UntilOpt = None, as_json: JsonOpt = False,
) -> None:
    """Deliver approved records not yet delivered to their route's verified topic, exactly once; safe to re-run."""
    who = clean_reviewer(reviewer or os.environ.get("BYZGUARD_REVIEWER") or getpass.getuser())
    selected = _filter(ids, reason=reason, source=source, type=type, entity=entity, route=route, since=since,
                       until=until)

    async def work(store: Any, progress: Progress) -> Any:
        task = progress.add_task("replay", total=None)
        return await store.replay(selected, runner=f"cli:{who}", batch_size=batch_size, rate=rate,
                                  progress=lambda d, t: progress.update(task, completed=d, total=t))

    report = _run(_store(config, broker), work)
    _print_report(report, as_json)
    if report.refused:
        raise typer.Exit(EXIT_REFUSED)
