"""`byzguard demo`: the seed's services (pricing, orders, payments, permissions) send traffic through a guard
worker, with every failure of the catalogue injected at a chosen rate, and the guard is scored against the
ground truth that only the generator knows.

Clean and faulty records go out through the project's own producer client (GuardedProducer, one per service,
each with its Stamper's Lamport clock and checksum or MAC). The labels stay in memory and in a local truth
file keyed by event id; the records carry nothing byzguard could read them from. What came out is read back
from the routes' verified and quarantine topics with read_committed consumers, and duplicates (which leave no
record) are counted from the worker's own /metrics.

`byzguard run` without a configured broker starts the local broker, a worker child process and this demo,
prints the score, and leaves the worker running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import orjson
import typer
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from app.cli import DEFAULT_EPS, DEFAULT_EVENTS, DEFAULT_RATE, DEMO_AUDIT_WINDOW, refuse_untested_versions
from app.dev.faults import (
    AUDITED_TYPE,
    EVENT_TYPES,
    QUARANTINE,
    SERVICES,
    SPECS,
    VERIFIED,
    Expect,
    Fate,
    FaultClass,
    Label,
    Observation,
    Report,
    TrafficGenerator,
    as_json,
    observe,
    score,
)
from app.dev.workers import WorkerProcess, http_get, web_base, worker_argv
from app.sidereads import started_side_consumer
from byzguard.audit import AuditRule
from byzguard.client.producer import GuardedProducer
from byzguard.config import GuardConfig
from byzguard.integrity import HMAC_SHA256, SHA256, Key

AUDIT = "audit"                     # an output topic of audit discrepancies
AUDIT_SCORED = "scored"



@dataclass(frozen=True)
class DemoOptions:
    """How much traffic, how many faults, and how to show it."""

    events: int = DEFAULT_EVENTS
    rate: float = DEFAULT_RATE
    eps: float = DEFAULT_EPS
    seed: int | None = None
    min_each: int = 1
    window: int = 250             # at most this many records sent and not yet judged
    audit_wait: float = 45.0      # wait for an orders audit to report partial writes if its window is this short
    audit_window: float | None = DEMO_AUDIT_WINDOW  # a worker the demo starts: orders audits wait this (None: as
                                                    # configured)
    stall_timeout: float = 60.0   # give up sending when no verdict arrives for this long
    drain_timeout: float = 90.0   # after the last send, how long to wait for the verdicts
    live: bool = True
    truth_path: Path | None = None
    report_path: Path | None = None


@dataclass(frozen=True)
class Where:
    """Where the worker the demo talks to can be looked at."""

    web: str | None = None          # e.g. http://127.0.0.1:6066 (None: not known)

    @property
    def metrics(self) -> str | None:
        return f"{self.web}/metrics" if self.web else None

    @property
    def review(self) -> str | None:
        return f"{self.web}/review/" if self.web else None


@dataclass
class DemoResult:
    """The score, the labels it was computed from, and what the run measured."""

    report: Report
    labels: list[Label]
    run_id: str
    seconds: float
    send_seconds: float
    duplicates_counted: int | None
    audit: str                      # how partial writes were judged: AUDIT_SCORED, or why they were not
    truth_path: Path | None
    topics: dict[str, str]          # service -> input topic
    outputs: dict[str, str]         # output topic -> VERIFIED | QUARANTINE
    observations: list[Observation] = field(default_factory=list)
    audited: dict[str, dict[str, Any]] = field(default_factory=dict)  # order -> the audit's discrepancy
    audit_rule: AuditRule | None = None  # the audit that judged partial writes (its window: the one used)
    shortened: dict[str, tuple[float, float]] = field(default_factory=dict)  # audit -> (configured, demo) windows

    def ok(self) -> bool:
        """Every per-event fault caught with an expected code, no false positive, nothing unaccounted."""
        rows = self.report.rows
        return (self.report.false_positives() == 0 and self.report.unaccounted() == 0 and
                all(rows[f.value].caught == rows[f.value].sent for f in FaultClass
                    if SPECS[f].expect is not Expect.AUDIT or self.audit == AUDIT_SCORED))


# ------------------------------------------------------------------------------------------ configuration


def service_topics(config: GuardConfig) -> dict[str, str]:
    """The input topic each seed service writes: an input of the route that declares its event type,
    preferring the one named like the service's topic (prices, orders, payments, permissions)."""
    preferred = {"pricing": "prices", "orders": "orders", "payments": "payments", "permissions": "permissions"}
    topics: dict[str, str] = {}
    for service, event_type in EVENT_TYPES.items():
        route = next((r for r in config.routes if event_type in r.types), None)
        if route is None:
            raise ValueError(f"no route of {config.source_path} declares the event type {event_type!r} that the "
                             f"demo's {service} service sends")
        named = [t for t in route.inputs if t.endswith(preferred[service])]
        topics[service] = named[0] if named else route.inputs[0]
    return topics


def service_keys(config: GuardConfig) -> dict[str, Key]:
    """The MAC key of each service whose event type must be signed (key_ids in the configuration)."""
    keys: dict[str, Key] = {}
    for service, event_type in EVENT_TYPES.items():
        for route in config.routes:
            policy = route.types.get(event_type)
            for key_id in sorted(policy.key_ids or ()) if policy is not None else ():
                key = config.keyring.get(key_id)
                if key is not None and key.source == service:
                    keys.setdefault(service, key)
    return keys


def order_audits(config: GuardConfig) -> list[AuditRule]:
    """The cross-stream audits that check orders (the only check that can see a partial write)."""
    return [rule for rule in config.audits if rule.left.type == AUDITED_TYPE]


def audit_horizon(rule: AuditRule) -> float:
    """Seconds after an order until the audit has surely reported it missing its payment."""
    return rule.within + rule.grace + 2 * rule.tick_interval + 5.0


@dataclass(frozen=True)
class DemoConfig:
    """The configuration a worker started by the demo runs: the given file, or a copy of it whose orders audits
    wait the demo's window."""

    path: Path                                   # the file the demo's worker reads
    config: GuardConfig
    shortened: dict[str, tuple[float, float]]    # audit name -> (configured window, the demo's), in seconds


def demo_config(config_path: Path, out_dir: Path, window: float | None = DEMO_AUDIT_WINDOW) -> DemoConfig:
    """The configuration for a worker the demo starts: `config_path` itself, or, when an audit of orders waits
    longer than `window` (None: keep every window), a copy in `out_dir` that differs only in those audits'
    `within` (each changed line says so). The user's file is never written."""
    import yaml

    from byzguard.config import load, parse_duration

    if window is None:
        return DemoConfig(config_path, load(config_path), {})
    text = config_path.read_text()
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    edits: list[tuple[int, int, str]] = []
    shortened: dict[str, tuple[float, float]] = {}
    for audit in _items(_child(root, "audits")):
        left, within, name = _child(audit, "left"), _child(audit, "within"), _child(audit, "name")
        if not isinstance(within, yaml.ScalarNode) or getattr(_child(left, "type"), "value", None) != AUDITED_TYPE:
            continue
        configured = parse_duration(yaml.safe_load(text[within.start_mark.index:within.end_mark.index]))
        if configured <= window:
            continue
        label = getattr(name, "value", "?")
        shortened[label] = (configured, window)
        start, end = within.start_mark.index, within.end_mark.index
        line_end = text.find("\n", end)
        line_end = len(text) if line_end < 0 else line_end
        new = f"{window:g}s"
        if not text[end:line_end].strip() or text[end:line_end].lstrip().startswith("#"):
            end = line_end  # a block mapping: the line's comment describes the old window, so it goes too
            new += f"  # byzguard demo: {_seconds(configured)} in {config_path.name}, shortened for the demo's run"
        edits.append((start, end, new))
    if not shortened:
        return DemoConfig(config_path, load(config_path), {})
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    header = (f"# Written by `byzguard demo` for the worker it starts: {config_path.resolve()} with the orders\n"
              f"# audit window{'s' if len(shortened) > 1 else ''} ({', '.join(shortened)}) shortened to "
              f"{_seconds(window)}, so the demo sees its partial writes\n"
              "# reported within its run. Production windows are longer (they cover real payment delays): run your\n"
              "# own workers with your configuration, not with this file.\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{config_path.stem}.demo.yaml"
    path.write_text(header + text)
    config = load(path)
    if any(rule.within != window for rule in config.audits if rule.name in shortened):
        raise RuntimeError(f"{path}: the demo could not shorten the audit windows of {config_path}")
    return DemoConfig(path, config, shortened)


def _child(node: Any, key: str) -> Any:
    """The value node of `key` in a YAML mapping node (None if absent or not a mapping)."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if getattr(k, "value", None) == key:
                return v
    return None


def _items(node: Any) -> list[Any]:
    import yaml

    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _seconds(seconds: float) -> str:
    """A window as a person says it: 20 s, 10 min, 2 h."""
    for unit, size in (("h", 3600.0), ("min", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


# ------------------------------------------------------------------------------------------ the worker child


def worker_env(settings: Any, bootstrap: str) -> dict[str, str]:
    """The environment of a worker child: ours (MAC key secrets included) plus every setting of `settings` as its
    BYZGUARD_* variable, the broker the demo uses, and no demo of its own."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"BYZGUARD_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update({"BYZGUARD_BROKER": bootstrap, "BYZGUARD_CONFIG": str(Path(settings.config).resolve()),
                "BYZGUARD_DEMO": "0"})
    return env


# ------------------------------------------------------------------------------------------ reading back


def scrape_counter(metrics_url: str | None, name: str, **match: str) -> int | None:
    """The sum of a counter's samples whose labels match, from a worker's /metrics; None if it does not answer."""
    if metrics_url is None:
        return None
    body = http_get(metrics_url)
    if body is None:
        return None
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items()):
                total += sample.value
    return int(total)


class Outputs:
    """Reads the verified, quarantine and audit topics (read_committed) from where they ended at the start."""

    def __init__(self, bootstrap: str, where_of: Mapping[str, str], run_prefix: str) -> None:
        self.bootstrap = bootstrap
        self.where_of = dict(where_of)     # topic -> VERIFIED | QUARANTINE | AUDIT
        self.run_prefix = run_prefix
        self.observations: list[Observation] = []
        self.audited: dict[str, dict[str, Any]] = {}  # entity (order) -> the discrepancy an audit reported
        self.consumer: AIOKafkaConsumer | None = None
        self.received = 0

    async def start(self, timeout: float = 60.0) -> None:
        parts = await _partitions(self.bootstrap, [t for t, w in self.where_of.items() if w != AUDIT], timeout)
        # An audit topic appears with the audit's first discrepancy at the latest: read it if it is there.
        parts |= await _partitions(self.bootstrap, [t for t, w in self.where_of.items() if w == AUDIT], 5.0,
                                   required=False)
        consumer = await started_side_consumer(self.bootstrap)
        self.consumer = consumer
        tps = [TopicPartition(topic, p) for topic, n in parts.items() for p in range(n)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, ends[tp])

    async def follow(self, stats: LiveStats) -> None:
        """Poll until cancelled, counting what arrives in `stats`."""
        while True:
            for obs in await self.poll():
                stats.add(obs)

    async def poll(self) -> list[Observation]:
        """Read what has been committed since the last poll; keep the records of this run."""
        assert self.consumer is not None
        batch = await self.consumer.getmany(timeout_ms=200, max_records=5000)
        new: list[Observation] = []
        for tp, records in batch.items():
            where = self.where_of[tp.topic]
            for record in records:
                if where == AUDIT:
                    self._discrepancy(record.value)
                    continue
                obs = observe(where, record.value, list(record.headers or ()))
                if obs is not None and obs.event_id.startswith(self.run_prefix):
                    new.append(obs)
        self.received += len(new)
        self.observations.extend(new)
        return new

    def _discrepancy(self, value: bytes | None) -> None:
        try:
            discrepancy = orjson.loads(value or b"{}")
            entity = discrepancy.get("entity")
        except (orjson.JSONDecodeError, AttributeError):
            return
        if isinstance(entity, str) and self.run_prefix.rstrip("-") in entity:
            self.audited[entity] = discrepancy

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()


async def _partitions(bootstrap: str, topics: list[str], timeout: float, *, required: bool = True) -> dict[str, int]:
    """Partition counts of `topics`, waiting for a worker to create them (those that exist, if not `required`)."""
    if not topics:
        return {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            described = await admin.describe_topics(topics)
            counts = {d["topic"]: len(d["partitions"]) for d in described
                      if not d.get("error_code") and d.get("partitions")}
            if len(counts) == len(topics):
                return counts
            if time.monotonic() > deadline:
                if not required:
                    return counts
                missing = sorted(set(topics) - set(counts))
                raise RuntimeError(f"topics {missing} do not exist (is a worker running with this configuration?)")
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


# ------------------------------------------------------------------------------------------ the live view


@dataclass
class LiveStats:
    """What the terminal shows while the demo runs."""

    total: int
    started: float = field(default_factory=time.monotonic)
    sent: int = 0
    faults: int = 0
    verified: int = 0
    warned: int = 0
    quarantined: int = 0
    by_code: Counter[str] = field(default_factory=Counter)
    duplicates: int | None = None
    phase: str = "sending"
    _sent_times: deque[tuple[float, int]] = field(default_factory=deque)
    _out_times: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, obs: Observation) -> None:
        if obs.where == QUARANTINE:
            self.quarantined += 1
            self.by_code.update(set(obs.codes))
        elif obs.verdict == "pass":
            self.verified += 1
        else:
            self.warned += 1
            self.by_code.update(set(obs.codes))

    @staticmethod
    def _rate(window: deque[tuple[float, int]], count: int) -> float:
        now = time.monotonic()
        window.append((now, count))
        while len(window) > 2 and now - window[0][0] > 3.0:
            window.popleft()
        span = now - window[0][0]
        return (count - window[0][1]) / span if span > 0 else 0.0

    def render(self) -> Table:
        outputs = self.verified + self.warned + self.quarantined
        table = Table(title=f"byzguard demo: {self.phase} ({time.monotonic() - self.started:.0f} s)",
                      show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("sent", f"{self.sent} / {self.total}  ({self._rate(self._sent_times, self.sent):.0f}/s), "
                              f"{self.faults} faults injected")
        table.add_row("verdicts read back", f"{outputs}  ({self._rate(self._out_times, outputs):.0f}/s)")
        table.add_row("[green]verified (pass)", str(self.verified))
        table.add_row("[yellow]forwarded with a warning", str(self.warned))
        table.add_row("[red]quarantined", str(self.quarantined))
        table.add_row("duplicates dropped", "?" if self.duplicates is None else str(self.duplicates))
        for code, n in self.by_code.most_common(12):
            table.add_row(f"  [dim]{code}", str(n))
        return table


# ------------------------------------------------------------------------------------------ the run


async def run_demo(bootstrap: str, config: GuardConfig, options: DemoOptions, *, where: Where = Where(),
                   console: Console | None = None, run_id: str | None = None) -> DemoResult:
    """Send labeled traffic to the routes' inputs, read the verdicts back, and score them."""
    console = console or Console()
    run_id = run_id or f"demo{secrets.token_hex(3)}"
    topics = service_topics(config)
    keys = service_keys(config)
    forger = next(iter(keys.values()), None)
    audits = order_audits(config)
    where_of = {r.verified_topic: VERIFIED for r in config.routes} | {r.quarantine_topic: QUARANTINE
                                                                     for r in config.routes}
    where_of |= {rule.discrepancies_topic: AUDIT for rule in audits}
    truth_path = options.truth_path
    if truth_path is not None:
        truth_path.parent.mkdir(parents=True, exist_ok=True)
    outputs = Outputs(bootstrap, where_of, f"{run_id}-")
    stats = LiveStats(options.events)
    reader: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    try:
        await outputs.start()
        dup_base = scrape_counter(where.metrics, "byzguard_events_total", outcome="duplicate")
        checks_base = scrape_counter(where.metrics, "byzguard_audit_checks_total", rule=audits[0].name) \
            if audits else None
        started = time.monotonic()
        reader = asyncio.create_task(outputs.follow(stats))
        watcher = asyncio.create_task(_watch_duplicates(where, dup_base, stats))
        async with contextlib.AsyncExitStack() as stack:
            producers: dict[str, GuardedProducer] = {}
            # Each producer's Lamport clock is a hybrid logical clock under an instance id of its own, so a
            # second run against the same worker state needs no setup (byzguard.stamp.Stamper).
            for service in SERVICES:
                key = keys.get(service)
                producer = GuardedProducer(bootstrap, source=service, algorithm=HMAC_SHA256 if key else SHA256,
                                           key=key, linger_ms=20)
                producers[service] = await stack.enter_async_context(producer)
            seed = options.seed if options.seed is not None else secrets.randbits(32)
            gen = TrafficGenerator({s: p.stamper for s, p in producers.items()}, topics, run_id=run_id,
                                   rate=options.rate, seed=seed, forger_key=forger, min_each=options.min_each,
                                   warmup=min(60, options.events // 10))
            truth = stack.enter_context(truth_path.open("wb")) if truth_path is not None else None
            live = stack.enter_context(Live(get_renderable=stats.render, console=console, refresh_per_second=4,
                                            transient=False)) if options.live else None
            send_seconds = await _send(gen, producers, options, stats, outputs, truth)
            stats.phase = "waiting for the last verdicts"
            dup_count = await _drain(gen.labels, outputs, stats, where, dup_base, options.drain_timeout)
            audit = await _await_audits(audits, gen.labels, outputs, stats, where, checks_base, options.audit_wait)
            stats.phase = "done"
            if live is not None:
                live.refresh()
    finally:
        for task in (watcher, reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await outputs.stop()
    report = score(gen.labels, outputs.observations, duplicates_counted=dup_count,
                   audited=outputs.audited.keys() if audit == AUDIT_SCORED else None)
    result = DemoResult(report, gen.labels, run_id, time.monotonic() - started, send_seconds, dup_count,
                        audit, truth_path, topics, where_of, outputs.observations, outputs.audited,
                        audits[0] if audits else None)
    if options.report_path is not None:
        options.report_path.parent.mkdir(parents=True, exist_ok=True)
        options.report_path.write_bytes(as_json(report))
    return result


async def _send(gen: TrafficGenerator, producers: Mapping[str, GuardedProducer], options: DemoOptions,
                stats: LiveStats, outputs: Outputs, truth: IO[bytes] | None) -> float:
    """Send `options.events` records at up to `options.eps`, never more than `options.window` ahead of the
    verdicts read back: a worker that lags far behind would judge time-based faults late (a clock 30 s
    ahead is no longer ahead when it is verified 30 s later). Stops early if the worker makes no progress."""
    started = time.monotonic()
    drops = 0
    for i in range(options.events):
        injection = gen.next(time.time())
        if truth is not None:
            truth.write(orjson.dumps(injection.label.as_dict(), option=orjson.OPT_APPEND_NEWLINE))
        await producers[injection.sender].send_stamped(injection.topic, injection.record)
        stats.sent += 1
        stats.faults += injection.label.fault is not None
        drops += injection.label.expect is Expect.DROP
        if i % 25 == 24:  # pace, and let the reader and the live view run
            ahead = (i + 1) / options.eps - (time.monotonic() - started)
            await asyncio.sleep(max(0.0, ahead))
            progress, since = outputs.received, time.monotonic()
            while stats.sent - drops - outputs.received > options.window:
                for producer in producers.values():
                    await producer.flush()
                if outputs.received != progress:
                    progress, since = outputs.received, time.monotonic()
                elif time.monotonic() - since > options.stall_timeout:
                    stats.phase = f"the worker made no progress for {options.stall_timeout:.0f} s"
                    return await _flushed(producers, started)
                await asyncio.sleep(0.05)
    for injection in gen.flush(time.time()):  # the payments of the last orders
        if truth is not None:
            truth.write(orjson.dumps(injection.label.as_dict(), option=orjson.OPT_APPEND_NEWLINE))
        await producers[injection.sender].send_stamped(injection.topic, injection.record)
        stats.sent += 1
        stats.total = max(stats.total, stats.sent)  # the payments owed beyond --events are sent too
    return await _flushed(producers, started)


async def _flushed(producers: Mapping[str, GuardedProducer], started: float) -> float:
    for producer in producers.values():
        await producer.flush()
    return time.monotonic() - started


async def _watch_duplicates(where: Where, base: int | None, stats: LiveStats) -> None:
    """Keep the live view's duplicate count (from the worker's /metrics) current."""
    while base is not None:
        now = await asyncio.to_thread(scrape_counter, where.metrics, "byzguard_events_total", outcome="duplicate")
        if now is not None:
            stats.duplicates = now - base
        await asyncio.sleep(2.0)


async def _drain(labels: list[Label], outputs: Outputs, stats: LiveStats, where: Where, dup_base: int | None,
                 timeout: float) -> int | None:
    """Wait until every record that should leave a verdict has, and the duplicates are counted, or time is up."""
    expected: Counter[tuple[str, str]] = Counter((lb.event_id, lb.fingerprint) for lb in labels
                                                 if lb.expect is not Expect.DROP)
    drops = sum(1 for lb in labels if lb.expect is Expect.DROP)
    deadline = time.monotonic() + timeout
    dup_count: int | None = None
    while True:
        now_dups = await asyncio.to_thread(scrape_counter, where.metrics, "byzguard_events_total", outcome="duplicate")
        dup_count = now_dups - dup_base if now_dups is not None and dup_base is not None else None
        stats.duplicates = dup_count
        seen = Counter((o.event_id, o.fingerprint) for o in outputs.observations)
        pending = sum(max(0, n - seen[k]) for k, n in expected.items())
        if (pending == 0 and (dup_count is None or dup_count >= drops)) or time.monotonic() > deadline:
            return dup_count
        await asyncio.sleep(0.5)


async def _await_audits(audits: list[AuditRule], labels: list[Label], outputs: Outputs, stats: LiveStats,
                        where: Where, checks_base: int | None, wait: float) -> str:
    """Wait for the orders audit to report the partial writes, when its window is short enough to wait for;
    AUDIT_SCORED, or why partial writes are not scored. The wait ends when every partial write is reported; or,
    once every window has closed, when the audit has checked every order of the run (its checks counter on the
    worker's /metrics); or a minute later, for an audit that lags behind."""
    if not audits:
        return "no cross-stream audit of orders is configured; per-event checks cannot see a partial write"
    rule = audits[0]
    horizon = audit_horizon(rule)
    if horizon > wait:
        return (f"pending: audit {rule.name!r} waits {_seconds(rule.within)} for a payment, longer than the demo "
                f"waits; its discrepancies arrive on {rule.discrepancies_topic} after that")
    partial = {lb.subject for lb in labels if lb.fault is FaultClass.PARTIAL_WRITE}
    verified = {(o.event_id, o.fingerprint) for o in outputs.observations if o.where == VERIFIED}
    orders = sum(1 for lb in labels if lb.event_type == AUDITED_TYPE and (lb.event_id, lb.fingerprint) in verified)
    stats.phase = f"waiting for audit {rule.name} ({_seconds(rule.within)} window)"
    started = time.monotonic()
    while time.monotonic() < started + horizon + 60.0:
        if partial <= outputs.audited.keys():
            break
        if time.monotonic() > started + horizon:  # every window has closed, if the audit keeps up
            checks = await asyncio.to_thread(scrape_counter, where.metrics, "byzguard_audit_checks_total",
                                             rule=rule.name)
            if checks is not None and checks_base is not None and checks - checks_base >= orders:
                break  # it has checked every order of the run: the partial writes it did not report, it missed
        await asyncio.sleep(0.5)
    return AUDIT_SCORED


# ------------------------------------------------------------------------------------------ the final table


def render_result(result: DemoResult, where: Where, console: Console) -> None:
    """The table of injected faults against what byzguard caught, false positives, and where to look."""
    report = result.report
    console.line()
    table = Table(title=f"byzguard demo {result.run_id}: {len(result.labels)} events in {result.send_seconds:.1f} s "
                        f"({len(result.labels) / max(result.send_seconds, 1e-9):.0f}/s), scored after "
                        f"{result.seconds:.1f} s", title_justify="left")
    if console.width < NARROW:
        console.print(_narrow_table(result, table.title))
        _render_summary(result, where, console)
        return
    story = console.width >= 150  # the catalogue's words need room; narrow terminals get the numbers
    columns = [("fault class", "left"), ("what happened", "left"), ("injected", "right"), ("expected", "left"),
               ("caught", "right"), ("other code", "right"), ("missed", "right"), ("lost", "right"),
               ("codes seen", "left")]
    for name, justify in columns:
        if name != "what happened" or story:
            table.add_column(name, justify=justify)  # type: ignore[arg-type]

    def add(*cells: str) -> None:
        table.add_row(*(c for i, c in enumerate(cells) if i != 1 or story))

    for fault in FaultClass:
        c = _cells(result, fault)
        add(fault.value, SPECS[fault].story, str(report.rows[fault.value].sent), c.expected, c.caught, c.other,
            c.missed, c.lost, c.seen)
    clean = report.clean
    table.add_section()
    add("[bold]clean", "correct events of the four services", str(clean.sent), "pass",
        f"{clean.fates[Fate.PASSED]} passed", _red(clean.fates[Fate.FALSE_POSITIVE], " FP"), "",
        _red(clean.fates[Fate.UNACCOUNTED]), ", ".join(f"{c} {n}" for c, n in clean.codes_seen.most_common(3)))
    console.print(table)
    _render_summary(result, where, console)


@dataclass(frozen=True)
class _Cells:
    caught: str
    expected: str
    other: str
    missed: str
    lost: str
    seen: str


def _cells(result: DemoResult, fault: FaultClass) -> _Cells:
    """The table's cells for one fault class (both layouts)."""
    row, spec = result.report.rows[fault.value], SPECS[fault]
    seen = ", ".join(f"{c} {n}" for c, n in row.codes_seen.most_common(3))
    lost = " ".join(x for x in (_red(row.fates[Fate.UNACCOUNTED]), _red(row.fates[Fate.FALSE_POSITIVE], " FP")) if x)
    other = str(row.fates[Fate.OTHER_CODE] or "")
    if spec.expect is Expect.AUDIT and result.audit != AUDIT_SCORED:
        return _Cells("pending" if result.audit.startswith("pending") else "n/a", f"audit: {result.audit}", other,
                      f"{row.fates[Fate.PASSED]} passed", lost, seen)
    expected = f"{spec.expect.value}: {' | '.join(row.expected_codes) or 'payment missing'}"
    if spec.expect is Expect.AUDIT and result.audit_rule is not None:
        rule = result.audit_rule
        expected = f"audit {rule.name}, {_seconds(rule.within)} window: payment missing"
    return _Cells(f"[{'green' if row.caught == row.sent else 'red'}]{row.caught}/{row.sent}[/]", expected, other,
                  _red(row.fates[Fate.MISSED]) or "0", lost, seen)


NARROW = 120  # below this width the table folds what it expected and saw into one column


def _narrow_table(result: DemoResult, title: Any) -> Table:
    """The score for a narrow terminal (80 columns): the numbers in short columns, the codes expected and seen
    folded into the last one, so no cell is cut."""
    report = result.report
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    table.add_column("fault class", no_wrap=True)
    for name in ("caught", "other", "missed", "lost"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("expected / seen", overflow="fold")
    for fault in FaultClass:
        c = _cells(result, fault)
        table.add_row(fault.value, c.caught, c.other, c.missed, c.lost, c.expected + (f"\nseen: {c.seen}" if c.seen
                                                                                       else ""))
    clean = report.clean
    table.add_section()
    seen = ", ".join(f"{c} {n}" for c, n in clean.codes_seen.most_common(3))
    table.add_row("[bold]clean", f"{clean.fates[Fate.PASSED]}/{clean.sent}",
                  _red(clean.fates[Fate.FALSE_POSITIVE], " FP"), "", _red(clean.fates[Fate.UNACCOUNTED]),
                  "pass" + (f"\nseen: {seen}" if seen else ""))
    return table


def _render_summary(result: DemoResult, where: Where, console: Console) -> None:
    report = result.report
    clean = report.clean
    fp = report.false_positives()
    unaccounted = report.unaccounted()
    partial = report.rows[FaultClass.PARTIAL_WRITE.value].sent
    summary = [
        f"false positives: [{'green' if fp == 0 else 'red'}]{fp}[/] of the {clean.sent + partial} events that must "
        f"pass ({clean.sent} clean + {partial} partial-write orders, each correct on its own)",
        f"events unaccounted for (in neither topic, not a counted duplicate): "
        f"[{'green' if unaccounted == 0 else 'red'}]{unaccounted}[/]",
        "duplicates counted by the worker: "
        + ("unknown (no metrics URL)" if result.duplicates_counted is None else str(result.duplicates_counted)),
    ]
    rule = result.audit_rule
    if rule is not None and result.audit == AUDIT_SCORED:
        if rule.name in result.shortened:
            summary.append(f"partial writes: judged by audit {rule.name} with the demo's {_seconds(rule.within)} "
                           f"window; your configuration's {_seconds(result.shortened[rule.name][0])} is what your "
                           "workers use (production windows cover real payment delays)")
        else:
            summary.append(f"partial writes: judged by audit {rule.name} with its configured "
                           f"{_seconds(rule.within)} window")
    if report.extra:
        summary.append(f"outputs that match no sent record: {report.extra}")
    console.print("\n".join(summary))
    look = [f"inputs: {', '.join(f'{t} ({s})' for s, t in result.topics.items())}",
            f"verified topics: {', '.join(sorted(t for t, w in result.outputs.items() if w == VERIFIED))}",
            f"quarantine topics: {', '.join(sorted(t for t, w in result.outputs.items() if w == QUARANTINE))}"]
    if where.review:
        look.insert(0, f"review page: {where.review}")
    if where.metrics:
        look.insert(1, f"metrics: {where.metrics}")
    if result.truth_path is not None:
        look.append(f"ground truth (one JSON line per event): {result.truth_path}")
    console.print(Panel("\n".join(look), title="where to look", expand=False))


def _red(n: int, suffix: str = "") -> str:
    return f"[red]{n}{suffix}[/]" if n else ""


# ------------------------------------------------------------------------------------------ orchestration


def start_worker(settings: Any, bootstrap: str, console: Console) -> WorkerProcess:
    """Start a worker child with these settings and wait until it answers; its output goes to a log file."""
    web = web_base(settings.web_host, settings.web_port)
    if http_get(f"{web}/healthz", timeout=1.0) is not None:
        raise RuntimeError(f"something already answers at {web} (another byzguard worker?): stop it, or give this "
                           "one another port with BYZGUARD_WEB_PORT")
    log_path = Path(settings.data_dir).parent / "worker.log"
    # In the terminal's process group: a Ctrl-C reaches the worker as well as the demo (`_follow`).
    worker = WorkerProcess("worker", worker_env(settings, bootstrap), log_path, argv=worker_argv("--no-demo"),
                           web=web, new_session=False)
    console.print(f"[cyan]starting a guard worker on the {settings.runtime} runtime, {settings.processing_guarantee} "
                  f"(log: {log_path}; README \"Runtimes\" says why)...[/]")
    worker.start()
    try:
        worker.wait_ready(timeout=120.0)
    except BaseException:
        worker.stop()
        raise
    return worker


def play(settings: Any, config: GuardConfig, bootstrap: str, options: DemoOptions, console: Console, *,
         worker: str = "auto", keep_running: bool = False) -> DemoResult:
    """Run the demo against a worker: the one answering at the settings' web port, or (worker="start", or
    "auto" with none answering) a child worker started here, stopped at the end unless `keep_running`.

    A worker started here runs `demo_config`: the settings' configuration with the orders audits waiting
    `options.audit_window`, so that the partial writes are scored within the run. One kept running afterwards
    is restarted with the configuration as it is."""
    web = web_base(settings.web_host, settings.web_port)
    running = http_get(f"{web}/healthz", timeout=1.0) is not None
    if worker == "none" or (worker == "auto" and running):
        return _play_once(bootstrap, config, options, Where(web if running else None), console)
    demo = demo_config(Path(settings.config), Path(settings.data_dir).parent / "demo", options.audit_window)
    for name, (configured, window) in demo.shortened.items():
        console.print(f"[cyan]the demo's worker runs {demo.path}: audit {name} waits {_seconds(window)} there "
                      f"({_seconds(configured)} in {settings.config}), so its partial writes are reported within "
                      "the run[/]")
    if demo.shortened:  # wait for the shortened windows, whatever their length
        options = replace(options, audit_wait=max([options.audit_wait] + [audit_horizon(rule) for rule in
                                                                           order_audits(demo.config)]))
    child = start_worker(settings.model_copy(update={"config": demo.path}), bootstrap, console)
    try:
        result = _play_once(bootstrap, demo.config, options, Where(web), console, demo.shortened)
    except BaseException:
        child.stop()
        raise
    if not keep_running:
        child.stop()
        return result
    if demo.shortened:
        console.print(f"[cyan]restarting the worker with {settings.config} as it is (audit windows "
                      f"{', '.join(f'{n} {_seconds(c)}' for n, (c, _) in demo.shortened.items())})...[/]")
        child.stop()
        child = start_worker(settings, bootstrap, console)
    _follow(child, console)
    return result


def _play_once(bootstrap: str, config: GuardConfig, options: DemoOptions, where: Where, console: Console,
               shortened: dict[str, tuple[float, float]] | None = None) -> DemoResult:
    run_id = f"demo{secrets.token_hex(3)}"
    if options.truth_path is None:
        options = DemoOptions(**{**options.__dict__, "truth_path": Path(".cache/demo") / f"{run_id}.truth.jsonl"})
    console.print(f"[cyan]demo {run_id}: {options.events} events from pricing, orders, payments and permissions, "
                  f"each failure class at {options.rate:.1%}, about {options.eps:.0f} events/s[/]")
    result = asyncio.run(run_demo(bootstrap, config, options, where=where, console=console, run_id=run_id))
    result.shortened = dict(shortened or {})
    render_result(result, where, console)
    return result


def _follow(child: WorkerProcess, console: Console) -> None:
    """Show the worker's log as it grows until it exits; Ctrl-C stops it."""
    console.print(f"[bold green]the worker keeps running[/] (pid {child.proc.pid if child.proc else '?'}): "
                  f"its log follows. Ctrl-C to stop.")
    try:
        with child.log_path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            while child.alive():
                chunk = log.read()
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.3)
            sys.stdout.write(log.read().decode(errors="replace"))
    except KeyboardInterrupt:
        console.print("[cyan]stopping the worker...[/]")
    finally:
        code = child.stop()
        console.print(f"worker stopped (exit code {code})")


# ------------------------------------------------------------------------------------------ commands


def announce_demo_secrets(config_path: Path, console: Console) -> None:
    """Local mode: make up the MAC key secrets that are not set, and say so."""
    from app.dev.local_secrets import CACHE, use_local_secrets

    made, reused = use_local_secrets(config_path)
    if made:
        console.print(f"[yellow]local mode: {', '.join(made)} not set; made up random secrets, kept in {CACHE} "
                      f"for the next runs and tools (set the variables to use your own)[/]")
    if reused:
        console.print(f"[yellow]local mode: {', '.join(reused)} not set; using the secrets kept in {CACHE}[/]")


def run_local(settings: Any, config: GuardConfig, bootstrap: str) -> int:
    """`byzguard run` with the local broker: a worker child, the demo against it, the score, then the worker's
    log until Ctrl-C. Exit code: the worker's (0 on a clean stop)."""
    console = Console()
    try:
        play(settings, config, bootstrap, DemoOptions(), console, worker="start", keep_running=True)
    except RuntimeError as exc:
        console.print(f"[bold red]cannot run the demo[/]: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def demo_main(*, events: int, rate: float, eps: float, seed: int | None, worker: str, config: Path | None,
              broker: str | None, live: bool, report: Path | None, audit_window: float) -> None:
    """The `byzguard demo` command (its options: app/cli.py): play the seed's services against a guard worker with
    every failure of the catalogue injected and score what it caught; exit 1 when a fault was missed, a clean
    event flagged or an event lost."""
    from app.dev.localkafka import ensure_running
    from app.settings import settings_or_exit
    from byzguard.config import load
    from byzguard.errors import ConfigError

    console = Console()
    if worker not in ("auto", "start", "none"):
        raise typer.BadParameter("--worker must be auto, start or none")
    settings = settings_or_exit({"config": config, "broker": broker},
                                option_names={"config": "--config", "broker": "--broker"})
    if worker != "none":  # it may start a worker: refuse untested library versions here, not in its log
        refuse_untested_versions(settings.allow_untested_versions)
    if not settings.broker:
        announce_demo_secrets(settings.config, console)
    try:
        cfg = load(settings.config)
    except ConfigError as exc:
        console.print(f"[bold red]configuration refused[/]: {exc}")
        raise typer.Exit(2) from None
    bootstrap = settings.broker or ensure_running()
    options = DemoOptions(events=events, rate=rate, eps=eps, seed=seed, live=live, report_path=report,
                          audit_window=audit_window or None)
    try:
        result = play(settings, cfg, bootstrap, options, console, worker=worker)
    except RuntimeError as exc:
        console.print(f"[bold red]cannot run the demo[/]: {exc}")
        raise typer.Exit(1) from None
    raise typer.Exit(0 if result.ok() else 1)
