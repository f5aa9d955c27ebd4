"""What the tests of users' own clients (kcat, a TypeScript/kafkajs producer) share: the clients' installation
(`make clients`), a worker on the example configuration's `prices` route, and subjects that librdkafka's and
Kafka's default partitioners place apart or alike.

A missing client fails its test with what installs it, never skips it silently: `make test` installs both
(`make clients`). BYZGUARD_TEST_CLIENTS=optional (read when the module is imported, before the suite's
autouse fixture clears BYZGUARD_* variables) turns that failure into a skip, for machines that cannot have them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import yaml

from byzguard.partitioner import partition_for
from tests import conftest as tests_conftest
from tests.integration.test_readme import namespaced_config
from tests.integration.worker_harness import WorkerFactory, WorkerProcess

REPO = Path(__file__).resolve().parents[2]
TS_DIR = REPO / "tests" / "clients" / "ts"
TS_PRODUCER = TS_DIR / "dist" / "producer.js"


def missing(what: str) -> NoReturn:
    """Fail (or, with BYZGUARD_TEST_CLIENTS=optional, skip) because a client is not installed."""
    tests_conftest.missing(f"{what}: `make clients` installs it (`make test` runs it)")


def make_clients() -> None:
    """Run `make clients` (kcat with apt-get when missing and we are root, as on CI; the TypeScript producer
    with npm ci and tsc when its build is missing or older than its sources)."""
    if shutil.which("make") is not None:
        subprocess.run(["make", "-s", "-C", str(REPO), "clients"], check=False, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def kcat_path() -> str:
    """kcat (Debian package kcat), installed by `make clients` when missing."""
    if shutil.which("kcat") is None:
        make_clients()
    found = shutil.which("kcat")
    if found is None:
        missing("kcat is not installed (apt-get install kcat)")
    return found


def ts_producer() -> Path:
    """The compiled TypeScript producer, built by `make clients` (npm ci, tsc) when missing or stale."""
    sources = [TS_DIR / name for name in ("producer.ts", "package-lock.json", "tsconfig.json")]
    if not TS_PRODUCER.exists() or TS_PRODUCER.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        make_clients()
    if shutil.which("node") is None or not TS_PRODUCER.exists():
        missing(f"the TypeScript producer is not built ({TS_PRODUCER.relative_to(REPO)}; needs node and npm)")
    return TS_PRODUCER


@dataclass(frozen=True)
class PricesWorker:
    """A worker on the example configuration's `prices` route, under test topic names."""

    worker: WorkerProcess
    topic: str
    verified: str
    quarantine: str
    partitions: int
    secret: str


def start_prices_worker(factory: WorkerFactory, tmp_path: Path) -> PricesWorker:
    """Start one worker on byzguard.yaml's `prices` route alone (its types, rules and key pricing-1, whose secret
    is fresh), with topics named for this test; check its log names the runtime the harness asked for."""
    factory.config_path = tmp_path / "byzguard.yaml"
    names = namespaced_config(factory.config_path, factory.app_id)
    doc = yaml.safe_load(factory.config_path.read_text())
    doc["routes"] = [r for r in doc["routes"] if r["name"] == names["prices"]]
    doc.pop("audits", None)
    factory.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    secret = secrets.token_hex(16)
    worker = factory.new_worker("w1")
    worker.env["BYZGUARD_KEY_PRICING_1"] = secret
    worker.start().wait_ready()
    assert "runtime: batched " in worker.log_text(), "the worker did not run the batched runtime"
    route = doc["routes"][0]
    return PricesWorker(worker, names["prices"], names["prices.verified"], names["prices.quarantine"],
                        route["partitions"], secret)


def crc32_partition(key: bytes, partitions: int) -> int:
    """Where librdkafka's default partitioner (consistent_random) puts a keyed record."""
    return zlib.crc32(key) % partitions


def split_subjects(prefix: str, apart: int, alike: int, partitions: int) -> tuple[list[str], list[str]]:
    """`apart` subjects that CRC32 and murmur2 place in different partitions, and `alike` they place alike."""
    found: tuple[list[str], list[str]] = ([], [])
    i = 0
    while len(found[0]) < apart or len(found[1]) < alike:
        subject = f"{prefix}-{i}"
        i += 1
        key = subject.encode()
        group = found[0] if crc32_partition(key, partitions) != partition_for(key, partitions) else found[1]
        if len(group) < (apart if group is found[0] else alike):
            group.append(subject)
    return found
