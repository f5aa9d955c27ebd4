"""Helpers for tests that run real `byzguard run` worker processes against the session's Kafka broker.

- `WorkerFactory` / `WorkerProcess`: per-test app id, config, data dirs, web ports and log files; start,
  wait until ready, stop (SIGTERM), kill (SIGKILL) as app/dev/workers.py does for the demo and the benchmark;
  every process is reaped at teardown.
- `Events`: stamped test events (clean, corrupted, regressed, forged, malformed) whose ids say what they are.
- `produce`, `collect`, `wait_caught_up`: feed an input topic, read outputs as a downstream read_committed
  consumer would (no group: every partition assigned, from the beginning), and wait until the worker's
  group has committed everything that was produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import socket
import time
import urllib.request
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from app.dev.localkafka import free_ports
from app.dev.workers import WorkerProcess as ChildWorker
from app.dev.workers import tail_lines
from app.sidereads import topic_partitions
from byzguard.client.producer import GuardedProducer
from byzguard.integrity import HMAC_SHA256, Key
from byzguard.stamp import Stamped, Stamper
from tests.conftest import claim_topics

_DIGITS = re.compile(r"\d+")
REPO = Path(__file__).resolve().parents[2]
TEST_ID = "x-test-id"  # our own header on records without a ce_id (malformed ones); workers keep it
SECRETS = {"BYZGUARD_KEY_ORDERS_1": "orders-secret-1", "BYZGUARD_KEY_PAYMENTS_1": "payments-secret-1"}
ORDERS_KEY = Key("orders-1", "orders", SECRETS["BYZGUARD_KEY_ORDERS_1"].encode())
PAYMENTS_KEY = Key("payments-1", "payments", SECRETS["BYZGUARD_KEY_PAYMENTS_1"].encode())

CONFIG_TEMPLATE = """\
# written by tests/integration/worker_harness.py for one test
keys:
  orders-1: {{source: orders, secret_env: BYZGUARD_KEY_ORDERS_1}}
  payments-1: {{source: payments, secret_env: BYZGUARD_KEY_PAYMENTS_1}}
routes:
  - name: orders
    inputs: [{input}]
    verified_topic: {verified}
    quarantine_topic: {quarantine}
    partitions: {partitions}
    require_checksum: true
    types:
      order.confirmed:
        sources: [orders]
      payment.captured:
        sources: [payments]
        key_ids: [payments-1]
"""


# --------------------------------------------------------------------------- worker processes


class WorkerError(AssertionError):
    """A worker did not start, stop or die as the test needed; the message ends with its log."""


class WorkerProcess(ChildWorker):
    """One `byzguard run` process with its own data dir, web port and log file (app/dev/workers.py); its log
    file keeps every start of it, each after a banner line."""

    def __init__(self, name: str, env: dict[str, str], data_dir: Path, log_path: Path, web_port: int) -> None:
        super().__init__(name, env, log_path, cwd=data_dir.parent, data_dir=data_dir, banner=True)
        self.web_port = web_port

    def log_tail(self, lines: int = 60) -> str:
        return super().log_tail(lines)

    def log_digest(self, lines: int = 150) -> str:
        """What a failure needs to be diagnosed: every distinct WARNING/ERROR line of the log (digits ignored)
        with its count and first occurrence, then its last `lines` lines."""
        kinds: dict[str, list[Any]] = {}
        for line in self.log_text().splitlines():
            if "] [WARNING] " in line or "] [ERROR] " in line or "] [CRITICAL] " in line:
                level_at = line.find("] [", line.find("] [") + 3)  # after "[time] [pid" comes "] [LEVEL]"
                key = _DIGITS.sub("#", line[level_at:])[:300]
                if key in kinds:
                    kinds[key][1] += 1
                else:
                    kinds[key] = [line, 1]
        warnings = "\n".join(f"{count:5d}x  {first[:400]}" for first, count in kinds.values()) or "(none)"
        return (f"----- WARNING/ERROR lines of {self.log_path} (count, first) -----\n{warnings}\n"
                f"----- last {lines} lines of {self.log_path} -----\n{tail_lines(self.log_text(), lines)}")

    def fail(self, what: str) -> WorkerError:
        code = self.returncode
        status = f"exit code {code}" if code is not None else "running"
        return WorkerError(f"worker {self.name} (pid {self.proc.pid if self.proc else '-'}, {status}): {what}\n"
                           f"{self.log_digest()}")

    def stop(self, timeout: float = 60.0, *, must_stop: bool = True) -> int:
        """SIGTERM and wait for a clean exit; a worker that does not stop in time is killed and fails."""
        code = super().stop(timeout, must_stop=must_stop)
        return code if code is not None else 0

    def metrics(self) -> dict[str, float]:
        """The worker's /metrics as {sample name: summed value}; empty while its web server is not up."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        sums: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
        return sums

    def events_processed(self) -> float:
        """Input records this process has routed so far (byzguard_events_total); 0 while it is starting."""
        return self.metrics().get("byzguard_events_total", 0.0)


@dataclass(frozen=True)
class RouteNames:
    """The topics of the one route a test's workers run."""

    input: str
    verified: str
    quarantine: str
    partitions: int


def input_group(app_id: str) -> str:
    """The consumer group that commits a route's input offsets: the batched runtime's own (app/runtime)."""
    from app.runtime import verify_group

    return verify_group(app_id)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def web_port() -> int:
    """A free port below the kernel's ephemeral range, for a worker's web server. A worker restarted at the port
    of a SIGKILLed one (its URL) removes the dead one's members only if it can bind that port: in the ephemeral
    range, an outgoing connection of any process on the machine may be given the port in between, and the restarted
    worker then waits for the dead one's session to time out."""
    low = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(max(1024, low - 10_000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds it
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return free_ports(1)[0]


@dataclass
class WorkerFactory:
    """Workers of one test: one app id (consumer group), one config, fresh topics; all reaped at the end."""

    bootstrap: str
    base_dir: Path
    prefix: str
    app_id: str = field(default_factory=lambda: f"bg-{uuid.uuid4().hex[:8]}")
    commit_interval: float = 0.2
    processing_guarantee: str = "exactly_once"
    workers: list[WorkerProcess] = field(default_factory=list)
    route: RouteNames | None = None
    config_path: Path | None = None

    def __post_init__(self) -> None:
        claim_topics(self.bootstrap, f"{self.app_id}-")  # its internal topics go when the test's module ends

    def configure(self, partitions: int = 4, *, partitioning: str | None = None) -> RouteNames:
        """Write this test's config with unique topic names (the worker's provisioning creates them);
        `partitioning`: the route's option of that name, when given."""
        suffix = uuid.uuid4().hex[:8]
        stem = claim_topics(self.bootstrap, f"{self.prefix[:60]}-{suffix}")
        self.route = RouteNames(f"{stem}-in", f"{stem}-verified", f"{stem}-quarantine", partitions)
        self.config_path = self.base_dir / "byzguard-test.yaml"
        text = CONFIG_TEMPLATE.format(input=self.route.input, verified=self.route.verified,
                                      quarantine=self.route.quarantine, partitions=partitions)
        if partitioning is not None:
            text += f"    partitioning: {partitioning}\n"
        self.config_path.write_text(text)
        return self.route

    def new_worker(self, name: str, *, data_dir: Path | None = None) -> WorkerProcess:
        """A worker process (not started) on its own web port; by default its own data dir `<name>-data`."""
        if self.config_path is None:
            self.configure()
        assert self.config_path is not None
        data_dir = data_dir or self.base_dir / f"{name}-data"
        port = web_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BYZGUARD_", "KAFKA_"))}
        env.update(SECRETS)
        env.update({
            "BYZGUARD_BROKER": self.bootstrap,
            "BYZGUARD_CONFIG": str(self.config_path),
            "BYZGUARD_APP_ID": self.app_id,
            "BYZGUARD_DATA_DIR": str(data_dir),
            "BYZGUARD_WEB_PORT": str(port),
            "BYZGUARD_COMMIT_INTERVAL": str(self.commit_interval),
            "BYZGUARD_PROCESSING_GUARANTEE": self.processing_guarantee,
            "BYZGUARD_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
        })
        worker = WorkerProcess(name, env, data_dir, self.base_dir / f"{name}.log", port)
        self.workers.append(worker)
        return worker

    def start(self, name: str, *, data_dir: Path | None = None, ready: bool = True,
              timeout: float = 90.0) -> WorkerProcess:
        """Start a worker and (by default) wait until it is ready."""
        worker = self.new_worker(name, data_dir=data_dir).start()
        if ready:
            worker.wait_ready(timeout)
        return worker

    def cleanup(self) -> None:
        """Kill whatever still runs (its topics are claimed: deleted when the module or session ends)."""
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.kill()


def wipe(data_dir: Path) -> None:
    """Delete a worker's data dir, so its state can only come back from the changelogs."""
    shutil.rmtree(data_dir, ignore_errors=True)


# --------------------------------------------------------------------------- events


class Events:
    """Stamps test events; an event's id names the outcome it must get: `<kind>-<subject>-<n>`."""

    def __init__(self) -> None:
        self.orders = Stamper("orders")
        self.payments = Stamper("payments", algorithm=HMAC_SHA256, key=PAYMENTS_KEY)
        self.forger = Stamper("payments", algorithm=HMAC_SHA256, key=ORDERS_KEY)
        self._n = 0

    def _id(self, kind: str, subject: str) -> str:
        self._n += 1
        return f"{kind}-{subject}-{self._n}"

    def clean(self, subject: str, version: int, *, kind: str = "clean") -> Stamped:
        """An order whose checksum, source and version are all right."""
        data = {"order": subject, "version": version, "amount": version * 10 + 0.5}
        return self.orders.binary(data, type="order.confirmed", subject=subject, version=version,
                                  time=time.time(), event_id=self._id(kind, subject))

    def payment(self, subject: str, version: int) -> Stamped:
        """A payment signed with the payments service's own key."""
        return self.payments.binary({"payment": subject, "amount": 12.5}, type="payment.captured",
                                    subject=subject, version=version, time=time.time(),
                                    event_id=self._id("clean", subject))

    def regression(self, subject: str, version: int) -> Stamped:
        """A well-formed order that carries an older version than the entity's verified one."""
        return self.clean(subject, version, kind="regression")

    def corrupted(self, subject: str, version: int) -> Stamped:
        """An order whose value has one byte flipped after its checksum was computed."""
        good = self.clean(subject, version, kind="corrupted")
        value = bytearray(good.value)
        value[len(value) // 2] ^= 0x01
        return Stamped(good.key, bytes(value), good.headers, good.event_id)

    def forged(self, subject: str, version: int) -> Stamped:
        """A payment that claims source `payments` but is signed with the orders service's key."""
        return self.forger.binary({"payment": subject, "amount": 99.0}, type="payment.captured",
                                  subject=subject, version=version, time=time.time(),
                                  event_id=self._id("forged", subject))

    def malformed(self, subject: str) -> Stamped:
        """A structured-mode CloudEvent whose JSON does not parse (identified by our own test header)."""
        event_id = self._id("malformed", subject)
        return Stamped(subject.encode(), b'{"specversion": "1.0", "id": ',
                       [("content-type", b"application/cloudevents+json"), (TEST_ID, event_id.encode())], event_id)


async def produce(bootstrap: str, topic: str, records: Iterable[Stamped]) -> int:
    """Send stamped records (keyed by entity, so partitioned by it) and wait for every acknowledgement."""
    n = 0
    async with GuardedProducer(bootstrap, source="test-harness") as producer:
        for record in records:
            await producer.send_stamped(topic, record)
            n += 1
        await producer.flush()
    return n


async def produce_numbered(bootstrap: str, topic: str, numbers: Iterable[int], *, partition: int = 0) -> None:
    """Send the plain records b"0", b"1", ... (no envelope) to one partition, one acknowledgement at a time, so
    record n lands at offset n of a new topic."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in numbers:
            await producer.send_and_wait(topic, b"%d" % i, partition=partition)
    finally:
        await producer.stop()


# --------------------------------------------------------------------------- reading outputs


@dataclass(frozen=True)
class Out:
    """One record as a downstream consumer sees it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int

    def header(self, name: str) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def event_id(self) -> str:
        raw = self.header("ce_id") or self.header(TEST_ID)
        return raw.decode() if raw is not None else f"<no id at {self.topic}-{self.partition}-{self.offset}>"

    @property
    def reasons(self) -> list[dict[str, str]]:
        raw = self.header("byzguard_reasons")
        return orjson.loads(raw) if raw else []

    @property
    def codes(self) -> set[str]:
        return {r["code"] for r in self.reasons}


async def collect(bootstrap: str, topic: str, *, expected: int | None = None, idle: float = 2.0,
                  timeout: float = 60.0, isolation_level: str = "read_committed") -> list[Out]:
    """Every record of `topic` from the beginning: until `expected` arrived and then `idle` seconds brought
    nothing more (so extras are seen too), or, without `expected`, until `idle` seconds brought nothing."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", isolation_level=isolation_level)
    await consumer.start()
    out: list[Out] = []
    try:
        tps = await _partitions_of(consumer, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(*tps, timeout_ms=200)
            for tp, records in batch.items():
                for r in records:
                    out.append(Out(tp.topic, tp.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp))
            if any(batch.values()):
                last_new = time.monotonic()
            elif (expected is None or len(out) >= expected) and time.monotonic() - last_new >= idle:
                break
        else:
            if expected is not None and len(out) < expected:  # a test that waits for more than comes waits long
                warnings.warn(f"collect({topic!r}): {len(out)} of the {expected} records expected after "
                              f"{timeout:.0f} s", stacklevel=2)
    finally:
        await consumer.stop()
    return out


async def _partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions, waiting up to 10 s for a topic created a moment ago."""
    partitions = await topic_partitions(consumer, [topic], patience=10)
    if not partitions:
        raise AssertionError(f"topic {topic!r} has no partitions")
    return partitions


async def wait_caught_up(bootstrap: str, group: str, topics: Sequence[str], *, timeout: float = 60.0,
                         workers: Sequence[WorkerProcess] = ()) -> None:
    """Wait until `group` has committed an offset at the end of every partition of `topics`.

    Under exactly_once an input offset is committed in the same transaction as the outputs and state
    writes it caused, so afterwards a read_committed consumer sees all of them.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await consumer.start()
    await admin.start()
    try:
        tps = [tp for t in topics for tp in await _partitions_of(consumer, t)]
        deadline = time.monotonic() + timeout
        lag: dict[TopicPartition, int] = {}
        while time.monotonic() < deadline:
            ends = await consumer.end_offsets(tps)
            done = {tp: 0 for tp in tps}
            for name in (group, input_group(group)):  # the app id's group or the batched runtime's own
                committed = await admin.list_consumer_group_offsets(name, partitions=tps)
                for tp, meta in committed.items():
                    if tp in done and meta.offset > done[tp]:
                        done[tp] = meta.offset
            lag = {tp: ends[tp] - done[tp] for tp in tps}
            if all(v <= 0 for v in lag.values()):
                return
            dead = [w for w in workers if not w.alive()]
            if dead:
                raise dead[0].fail(f"died while the group still lags {lag}")
            await asyncio.sleep(0.25)
        detail = "\n".join(f"===== {w.name} (pid {w.proc.pid if w.proc else '-'}) =====\n{w.log_digest()}"
                           for w in workers)
        raise AssertionError(f"group {group} still lags after {timeout:.0f} s: {lag}\n{detail}")
    finally:
        await admin.close()
        await consumer.stop()


def by_id(records: Iterable[Out]) -> dict[str, list[Out]]:
    """Records grouped by event id."""
    grouped: dict[str, list[Out]] = {}
    for record in records:
        grouped.setdefault(record.event_id, []).append(record)
    return grouped
