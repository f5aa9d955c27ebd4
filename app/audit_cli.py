"""`byzguard audit run RULE --since 1h`: run an audit rule on demand over a time range of the verified topics.

It reads the rule's verified topics directly with aiokafka (no consumer group, read_committed), from the
offsets at `since - within` (offsets_for_times) to the end as it was when the run started, joins the two
sides with the same pure code as the worker's audit agents (byzguard.audit), prints the discrepancies and
the agreement rate, and exits 1 when there are discrepancies (0 when none, 2 when it cannot run).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from app.sidereads import started_side_consumer, topic_partitions
from byzguard import config as guard_config
from byzguard.audit import AuditRule, Check, ConsistencyResult, Observation, audit_batch, event_time, observation_of
from byzguard.envelope import decode, parse_time
from byzguard.errors import ConfigError
from byzguard.routing import H_VERDICT

audit_cli = typer.Typer(help="Cross-stream consistency audits (docs/audits.md).",
                        no_args_is_help=True)
out = Console()
err = Console(stderr=True)

#: Record times of a partition are nearly ordered (set when byzguard forwards); stop reading a partition
#: once its records are this far past the range, in case another worker's clock was a little behind.
_READ_PAST = 60.0


def _when(text: str, now: float) -> float:
    """`1h`, `30m`, ... ago, or an RFC 3339 time."""
    try:
        return now - guard_config.parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_time(text, "time")
    except Exception:
        raise typer.BadParameter(f"{text!r} is neither a duration (1h, 30m) nor an RFC 3339 time") from None


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def read_observations(bootstrap: str, cfg: guard_config.GuardConfig, rule: AuditRule, *, start: float,
                            stop: float) -> list[Observation | Check]:
    """The rule's observations from records timed in [start, stop] on its verified topics."""
    routes = {r.verified_topic: r for r in cfg.routes}
    consumer = await started_side_consumer(bootstrap)
    items: list[Observation | Check] = []
    try:
        tps = await topic_partitions(consumer, rule.topics)
        for topic in rule.topics:
            if not any(tp.topic == topic for tp in tps):
                raise ConfigError(f"topic {topic!r} of audit {rule.name!r} does not exist on {bootstrap}")
        ends = await consumer.end_offsets(tps)
        found = await consumer.offsets_for_times({tp: int(start * 1000) for tp in tps})
        consumer.assign(tps)
        todo = set()
        for tp in tps:
            at = found.get(tp)
            first = at.offset if at is not None else ends[tp]
            if first < ends[tp]:
                consumer.seek(tp, first)
                todo.add(tp)
        while todo:
            batch = await consumer.getmany(*todo, timeout_ms=1000)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp] or record.timestamp / 1000 > stop + _READ_PAST:
                        todo.discard(tp)
                        break
                    at = record.timestamp / 1000
                    if start <= at <= stop:
                        items.extend(_observations(rule, routes, tp.topic, record, at))
            for tp in list(todo):
                if await consumer.position(tp) >= ends[tp]:
                    todo.discard(tp)
    finally:
        await consumer.stop()
    return items


def _observations(rule: AuditRule, routes: dict[str, guard_config.Route], topic: str, record: Any,
                  at: float) -> list[Observation | Check]:
    route = routes.get(topic)
    headers = list(record.headers or ())
    if route is None or dict(headers).get(H_VERDICT) == b"suspect":
        return []
    env = decode(record.key, record.value, headers, default_type=route.default_type)
    if isinstance(env, tuple):
        return []
    items: list[Observation | Check] = []
    for side in rule.sides_of(topic, env.type):
        item = observation_of(rule, side, env.data(), subject=env.subject, event_id=env.id,
                              at=event_time(env.time, at))
        if item is not None:
            items.append(item)
    return items


def _value(service: dict[str, Any]) -> str:
    if "eventId" not in service:
        return "[red]missing[/]"
    return orjson.dumps(service.get("value")).decode()


def print_result(result: ConsistencyResult, rule: AuditRule) -> None:
    """The discrepancies as a table, then the agreement rate."""
    if result.discrepancies:
        table = Table(title=f"audit {rule.name}: discrepancies {_iso(result.since)} .. {_iso(result.until)}")
        for column in ("kind", "key", "entity", rule.left.name, rule.right.name):
            table.add_column(column, overflow="fold")
        table.add_column("at (UTC)", no_wrap=True)
        for d in result.discrepancies:
            at = d.service_a.get("at") or d.service_b.get("at")
            table.add_row(f"[red]{d.kind.value}[/]", d.key, d.entity, _value(d.service_a), _value(d.service_b),
                          _iso(at)[11:19] if at else "")
        out.print(table)
    rate = result.agreement
    shown = f"{rate:.1%}" if rate is not None else "n/a (nothing checked)"
    colour = "green" if result.consistent else "red"
    out.print(f"[bold]{rule.name}[/]: {result.checks} checked, {result.passed} agreed, "
              f"[{colour}]{len(result.discrepancies)} discrepancies[/], {result.pending} still in their window; "
              f"agreement rate [bold {colour}]{shown}[/]")


@audit_cli.command("run")
def audit_run(
    rule: Annotated[str, typer.Argument(help="the audit rule's name (audits: in the configuration)")],
    since: Annotated[str, typer.Option(help="start of the range: a duration ago (1h, 30m) or an RFC 3339 time")]
    = "1h",
    until: Annotated[str | None, typer.Option(help="end of the range (default now)")] = None,
    config: Annotated[Path | None, typer.Option(help="routes file (default BYZGUARD_CONFIG or byzguard.yaml)")]
    = None,
    broker: Annotated[str | None, typer.Option(help="bootstrap servers; default BYZGUARD_BROKER or the local "
                                                    "broker")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON instead of a table")] = False,
) -> None:
    """Check a rule over a time range of the verified topics; exit 1 when there are discrepancies."""
    from app.settings import settings_or_exit

    settings = settings_or_exit({"config": config}, option_names={"config": "--config"})
    try:
        cfg = guard_config.load(settings.config, require_secrets=False)  # an audit checks no MAC
    except ConfigError as exc:
        err.print(f"[bold red]configuration refused[/]: {exc}")
        raise typer.Exit(2) from None
    spec = cfg.audit(rule)
    if spec is None:
        err.print(f"[bold red]no audit rule {rule!r}[/] in {settings.config}; rules: "
                  f"{', '.join(a.name for a in cfg.audits) or '(none)'}")
        raise typer.Exit(2)
    bootstrap = broker or settings.broker
    if not bootstrap:
        from app.settings import running_local_broker

        bootstrap = running_local_broker()
    if not bootstrap:
        err.print("[bold red]no broker[/]: pass --broker or set BYZGUARD_BROKER (no local broker is running)")
        raise typer.Exit(2)
    now = time.time()
    start, stop = _when(since, now), _when(until, now) if until else now
    if stop <= start:
        raise typer.BadParameter("--until must be after --since")
    try:
        items = asyncio.run(read_observations(bootstrap, cfg, spec, start=start - spec.within,
                                              stop=stop + spec.within))
    except ConfigError as exc:
        err.print(f"[bold red]cannot run[/]: {exc}")
        raise typer.Exit(2) from None
    # A window is closed once its end plus the grace has passed, as in the worker.
    result = audit_batch(spec, items, since=start, until=stop, now=time.time() - spec.grace)
    if as_json:
        print(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print_result(result, spec)
    raise typer.Exit(0 if result.consistent else 1)
