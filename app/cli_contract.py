"""`byzguard contract ...`: what would the guard do with these events? Before deploying a producer or a config.

    byzguard contract check CONFIG --route R --events FILE           # JSON lines, see byzguard.contract.sample
    byzguard contract check CONFIG --route R --topic T --sample N    # the last N records of a live topic
    byzguard contract check CONFIG --route R --topic T --sample N --first --snapshot
    byzguard contract diff OLD NEW --route R --events FILE           # what NEW newly rejects or warns

Reading a live topic never joins a consumer group and never commits offsets: the consumer has no group id
and assigns itself every partition (read_committed). `--sample N` takes the N most recent records across
partitions (by record timestamp, each partition in offset order); `--first` takes the N oldest still in
the topic. Records are checked in that order, with state kept per partition as the worker's co-partitioned
tables keep it. `--snapshot` starts from the live state instead of empty: the route's changelog topics
(`<app_id>-<route>-state_by_entity-changelog`, and the Lamport and causal-buffer ones when they exist)
read to their end, last value per key wins.

Exit status: 0 when no event would be rejected (or, for diff, when NEW rejects nothing OLD let through),
1 otherwise, 2 when the configuration, the sample or the broker cannot be used.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from byzguard.contract.check import (
    CHANGELOG_TABLES,
    Clock,
    Contract,
    ContractReport,
    Finding,
    Snapshot,
    load_contract,
    record_clock,
)
from byzguard.contract.diff import ContractDiff, diff_contracts
from byzguard.contract.sample import SampleError, parse_jsonl
from byzguard.errors import ConfigError
from byzguard.guard import RecordIn
from byzguard.verdict import Reason

contract_cli = typer.Typer(help="Contract checks: what would byzguard do with these events?", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

EXIT_PASS, EXIT_REJECTED, EXIT_UNUSABLE = 0, 1, 2

RouteOpt = Annotated[str | None, typer.Option("--route", "-r", help="route name or one of its input topics "
                                              "(optional with a single route)")]
EventsOpt = Annotated[Path | None, typer.Option("--events", "-e", help="JSON lines: {key, value | value_base64, "
                                                "headers} records, or plain event objects ('-' = stdin)")]
TopicOpt = Annotated[str | None, typer.Option("--topic", "-t", help="read a sample from this live topic")]
SampleOpt = Annotated[int, typer.Option("--sample", "-n", min=1, help="how many records to read from --topic")]
FirstOpt = Annotated[bool, typer.Option("--first", help="the oldest N records instead of the most recent N")]
BrokerOpt = Annotated[str | None, typer.Option(envvar="BYZGUARD_BROKER",
                                               help="bootstrap servers (default: the local broker if running)")]
AppIdOpt = Annotated[str, typer.Option(envvar="BYZGUARD_APP_ID", help="the guard's app id (changelog prefix)")]
NowOpt = Annotated[str, typer.Option(help="'auto' (each record's timestamp when it has one, else the wall "
                                     "clock), 'wall', or a fixed RFC 3339 time / epoch seconds")]
KeyFieldOpt = Annotated[str | None, typer.Option(help="for plain event objects: the (dotted) field holding the "
                                                 "entity id, used as the record key")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the report as JSON instead of a table")]
TimeoutOpt = Annotated[float, typer.Option(help="seconds to wait for the broker when reading topics")]


# --------------------------------------------------------------------------- Kafka (read-only, no group)


def _bootstrap(broker: str | None) -> str:
    if broker:
        return broker
    from app.settings import running_local_broker

    found = running_local_broker()
    if found is None:
        err.print("[bold red]no broker[/]: give --broker or set BYZGUARD_BROKER (no local broker is running)")
        raise typer.Exit(EXIT_UNUSABLE)
    return found


def _consumer(bootstrap: str) -> Any:
    from app.sidereads import side_consumer

    return side_consumer(bootstrap, request_timeout_ms=30_000)


async def _partitions(bootstrap: str, topics: Sequence[str]) -> dict[str, list[Any]]:
    """The partitions of those of `topics` that exist.

    Metadata of every topic is asked for: naming a missing topic in a metadata request would make a broker
    with auto.create.topics.enable create it, and a read-only tool must not create topics.
    """
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        described = await admin.describe_topics()
    finally:
        await admin.close()
    wanted = set(topics)
    return {t["topic"]: [TopicPartition(t["topic"], p["partition"]) for p in sorted(t["partitions"],
                                                                                   key=lambda p: p["partition"])]
            for t in described if t["topic"] in wanted and not t["error_code"] and t["partitions"]}


async def _read_ranges(consumer: Any, ranges: dict[Any, tuple[int, int]], timeout: float) -> dict[Any, list[Any]]:
    """Read [start, stop) of each partition; records of each partition in offset order."""
    got: dict[Any, list[Any]] = {tp: [] for tp in ranges}
    pending = {tp: stop for tp, (start, stop) in ranges.items() if start < stop}
    for tp, (start, stop) in ranges.items():
        if start < stop:
            consumer.seek(tp, start)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        if loop.time() > deadline:
            missing = ", ".join(f"{tp.topic}[{tp.partition}] up to {stop}" for tp, stop in pending.items())
            raise TimeoutError(f"could not read {missing} within {timeout:g}s")
        batch = await consumer.getmany(*pending, timeout_ms=300)
        for tp, records in batch.items():
            until = pending.get(tp)
            if until is None:
                continue
            got[tp].extend(r for r in records if r.offset < until)
        for tp in list(pending):
            # Transaction markers take offsets too: the position, not the last record, says when we are done.
            if await consumer.position(tp) >= pending[tp]:
                del pending[tp]
    return got


async def read_sample(bootstrap: str, topic: str, n: int, *, first: bool, timeout: float) -> list[Any]:
    """The N most recent (or, `first`, oldest) records of `topic`, merged across partitions by timestamp."""
    tps = (await _partitions(bootstrap, [topic])).get(topic)
    if not tps:
        raise LookupError(f"topic {topic!r} does not exist")
    consumer = _consumer(bootstrap)
    await consumer.start()
    try:
        consumer.assign(tps)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        ranges = {tp: (begin[tp], min(end[tp], begin[tp] + n)) if first else (max(begin[tp], end[tp] - n), end[tp])
                  for tp in tps}
        got = await _read_ranges(consumer, ranges, timeout)
    finally:
        await consumer.stop()
    # heapq.merge only ever compares the heads, so each partition keeps its offset order.
    merged = list(heapq.merge(*got.values(), key=lambda r: (r.timestamp, r.partition)))
    return merged[:n] if first else merged[-n:]


async def read_snapshot(bootstrap: str, app_id: str, route: str, *, timeout: float) -> tuple[Snapshot, list[str]]:
    """The route's live state from its changelog topics, read to their end; and the topics found."""
    snapshot = Snapshot()
    names = {f"{app_id}-{route}-{suffix}-changelog": table for suffix, table in CHANGELOG_TABLES.items()}
    existing = await _partitions(bootstrap, list(names))
    found = [topic for topic in names if topic in existing]
    if not found:
        return snapshot, found
    consumer = _consumer(bootstrap)
    await consumer.start()
    try:
        for topic in found:
            table = names[topic]
            tps = existing[topic]
            consumer.assign(tps)
            begin = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
            got = await _read_ranges(consumer, {tp: (begin[tp], end[tp]) for tp in tps}, timeout)
            for tp, records in got.items():
                for r in records:
                    if r.key is not None:
                        snapshot.put(table, tp.partition, r.key, r.value)
    finally:
        await consumer.stop()
    return snapshot, found


def _to_record(r: Any) -> RecordIn:
    return RecordIn(r.key, r.value, list(r.headers or ()), r.topic, r.partition, r.offset,
                    r.timestamp / 1000.0 if r.timestamp is not None else None)


# --------------------------------------------------------------------------- inputs


def _contract(config: Path, route: str | None) -> Contract:
    from app.settings import dev_tools_installed

    if not os.environ.get("BYZGUARD_BROKER") and dev_tools_installed():  # local mode: the MAC secrets the local
        from app.dev.local_secrets import use_local_secrets  # runs made up and kept (none without app/dev/)

        use_local_secrets(config, make_up=False)
    try:
        return load_contract(config, route)
    except ConfigError as exc:
        err.print(f"[bold red]configuration refused[/]: {exc}")
        raise typer.Exit(EXIT_UNUSABLE) from None


def _clock(now: str) -> Clock:
    if now == "auto":
        return record_clock()
    if now == "wall":
        return None
    try:
        value = float(now)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(now.replace("Z", "+00:00"))
        except ValueError:
            err.print(f"[bold red]--now[/]: {now!r} is not 'auto', 'wall', an RFC 3339 time or epoch seconds")
            raise typer.Exit(EXIT_UNUSABLE) from None
        if parsed.tzinfo is None:
            err.print("[bold red]--now[/]: give the time zone (e.g. 2026-11-30T09:00:00Z)")
            raise typer.Exit(EXIT_UNUSABLE) from None
        return parsed.timestamp()
    if not math.isfinite(value):
        err.print("[bold red]--now[/]: not a finite number")
        raise typer.Exit(EXIT_UNUSABLE)
    return value


def _load_sample(contract: Contract, events: Path | None, topic: str | None, sample: int, first: bool,
                 broker: str | None, key_field: str | None, timeout: float) -> tuple[list[RecordIn], list[str], bool]:
    """(records, labels, partitioned) from --events or --topic."""
    if (events is None) == (topic is None):
        err.print("[bold red]give exactly one of --events FILE or --topic T[/]")
        raise typer.Exit(EXIT_UNUSABLE)
    if events is not None:
        name = "<stdin>" if str(events) == "-" else str(events)
        try:
            lines = sys.stdin.read().splitlines() if name == "<stdin>" else events.read_text().splitlines()
            parsed = list(parse_jsonl(lines, topic=contract.route.inputs[0], key_field=key_field, source=name))
        except OSError as exc:
            err.print(f"[bold red]cannot read {name}[/]: {exc}")
            raise typer.Exit(EXIT_UNUSABLE) from None
        except SampleError as exc:
            err.print(f"[bold red]bad sample[/]: {exc}")
            raise typer.Exit(EXIT_UNUSABLE) from None
        return [r for _, r in parsed], [f"{name}:{line}" for line, _ in parsed], False
    assert topic is not None
    bootstrap = _bootstrap(broker)
    try:
        raw = asyncio.run(read_sample(bootstrap, topic, sample, first=first, timeout=timeout))
    except (LookupError, TimeoutError, OSError) as exc:
        err.print(f"[bold red]cannot read {topic!r}[/]: {exc}")
        raise typer.Exit(EXIT_UNUSABLE) from None
    except Exception as exc:  # aiokafka's KafkaError and friends: the broker is the problem
        err.print(f"[bold red]cannot read {topic!r} from {bootstrap}[/]: {type(exc).__name__}: {exc}")
        raise typer.Exit(EXIT_UNUSABLE) from None
    records = [_to_record(r) for r in raw]
    return records, [f"{r.topic}[{r.partition}]@{r.offset}" for r in records], True


def _snapshot(contract: Contract, broker: str | None, app_id: str, timeout: float) -> Snapshot:
    bootstrap = _bootstrap(broker)
    try:
        snapshot, found = asyncio.run(read_snapshot(bootstrap, app_id, contract.route.name, timeout=timeout))
    except Exception as exc:
        err.print(f"[bold red]cannot read the live state[/] from {bootstrap}: {type(exc).__name__}: {exc}")
        raise typer.Exit(EXIT_UNUSABLE) from None
    if not found:
        err.print(f"[yellow]no changelog of route {contract.route.name!r} for app id {app_id!r} "
                  f"({app_id}-{contract.route.name}-state_by_entity-changelog): starting from empty state[/]")
    else:
        err.print(f"snapshot: {len(snapshot)} key(s) from {', '.join(found)}")
    return snapshot


# --------------------------------------------------------------------------- output


def _reason_rows(table: Table, findings: Sequence[Finding], style: Callable[[Finding], str]) -> None:
    for f in findings:
        head = (f.where, f.key or "", f.event_type or "", f"[{style(f)}]{f.outcome.value}[/]")
        for i, r in enumerate(f.reasons):
            table.add_row(*(head if i == 0 else ("", "", "", "")), r.code.value, r.severity.value, r.detail)


def _outcome_style(f: Finding) -> str:
    return "bold red" if f.rejected else "yellow" if f.outcome.value in ("warned", "held") else "cyan"


def print_report(report: ContractReport) -> None:
    """The findings as a table (rejected, then warned and held, then duplicates), then the summary."""
    shown = [*report.rejected, *[f for f in report.findings if not f.rejected and f.outcome.value != "duplicate"],
             *report.duplicates]
    if shown:
        table = Table(title=f"route {report.route}: events byzguard would not simply pass", show_lines=False)
        for column in ("event", "key", "type", "outcome", "code", "severity", "detail"):
            table.add_column(column, overflow="fold")
        _reason_rows(table, shown, _outcome_style)
        out.print(table)
    colour = "green" if report.passed else "bold red"
    out.print(f"[{colour}]{report.summary()}[/]")
    for note in report.notes:
        out.print(f"[yellow]note[/]: {note}")


def print_diff(result: ContractDiff) -> None:
    """Each change as a table row per added or removed reason, then the summary."""
    if result.changes:
        table = Table(title=f"route {result.route}: what NEW does differently")
        for column in ("event", "key", "change", "old -> new", "code", "detail"):
            table.add_column(column, overflow="fold")
        for c in sorted(result.changes, key=lambda c: (c.kind != "newly_rejected", c.index)):
            style = "bold red" if c.kind == "newly_rejected" else "yellow" if c.kind == "newly_warned" else "cyan"
            rows: list[tuple[str, Reason | None]] = [("+", r) for r in c.added]
            rows += [("-", r) for r in c.removed]
            if not rows:
                rows = [("", None)]
            for i, (sign, r) in enumerate(rows):
                first = i == 0
                table.add_row(c.where if first else "", (c.key or "") if first else "",
                              f"[{style}]{c.kind}[/]" if first else "",
                              f"{c.old_outcome.value} -> {c.new_outcome.value}" if first else "",
                              f"{sign} {r.code.value} ({r.severity.value})" if r is not None else "",
                              r.detail if r is not None else "")
        out.print(table)
    out.print(f"[{'bold red' if result.breaking else 'green'}]{result.summary()}[/]")


# --------------------------------------------------------------------------- commands


@contract_cli.command("check")
def check(
    config: Annotated[Path, typer.Argument(help="the guard's routes file (byzguard.yaml)")],
    route: RouteOpt = None,
    events: EventsOpt = None,
    topic: TopicOpt = None,
    sample: SampleOpt = 100,
    first: FirstOpt = False,
    snapshot: Annotated[bool, typer.Option("--snapshot", help="start from the live state (the route's changelogs) "
                                           "instead of empty state")] = False,
    broker: BrokerOpt = None,
    app_id: AppIdOpt = "byzguard",
    now: NowOpt = "auto",
    key_field: KeyFieldOpt = None,
    fail_on_warn: Annotated[bool, typer.Option("--fail-on-warn", help="exit 1 on warnings too")] = False,
    expire_held: Annotated[bool, typer.Option("--expire-held", help="quarantine events still held for missing "
                                              "dependencies at the end as causal.gap")] = False,
    json_output: JsonOpt = False,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Report every event the route would quarantine or warn about; exit 1 when any would be rejected."""
    contract = _contract(config, route)
    clock = _clock(now)
    records, labels, partitioned = _load_sample(contract, events, topic, sample, first, broker, key_field, timeout)
    start = _snapshot(contract, broker, app_id, timeout) if snapshot else None
    report = contract.check(records, snapshot=start, now=clock, labels=labels, partitioned=partitioned,
                            expire_held=expire_held)
    if json_output:
        typer.echo(orjson.dumps(report.as_dict()).decode())
    else:
        print_report(report)
    failed = not report.passed or (fail_on_warn and bool(report.warned))
    raise typer.Exit(EXIT_REJECTED if failed else EXIT_PASS)


@contract_cli.command("diff")
def diff(
    old: Annotated[Path, typer.Argument(help="the configuration in force")],
    new: Annotated[Path, typer.Argument(help="the proposed configuration")],
    route: RouteOpt = None,
    events: EventsOpt = None,
    topic: TopicOpt = None,
    sample: SampleOpt = 100,
    first: FirstOpt = False,
    broker: BrokerOpt = None,
    now: NowOpt = "auto",
    key_field: KeyFieldOpt = None,
    fail_on_warn: Annotated[bool, typer.Option("--fail-on-warn", help="exit 1 on newly warned events too")] = False,
    json_output: JsonOpt = False,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """What NEW would newly reject or warn about, against OLD, on the same sample; exit 1 on new rejects."""
    old_contract = _contract(old, route)
    new_contract = _contract(new, route)
    clock = _clock(now)
    records, labels, partitioned = _load_sample(new_contract, events, topic, sample, first, broker, key_field,
                                                timeout)
    result = diff_contracts(old_contract, new_contract, records, now=clock, labels=labels, partitioned=partitioned)
    if json_output:
        typer.echo(orjson.dumps(result.as_dict()).decode())
    else:
        print_diff(result)
    failed = result.breaking or (fail_on_warn and bool(result.newly_warned))
    raise typer.Exit(EXIT_REJECTED if failed else EXIT_PASS)
