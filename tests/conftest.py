"""Suite-wide fixtures: one real Kafka broker per test session, and fresh topics per test.

``kafka_bootstrap`` (session scoped, lazy: only tests that request it start a broker) takes,
in order:

1. ``KAFKA_BOOTSTRAP_SERVERS`` when set (an external broker);
2. an ``apache/kafka:<version>`` container (KRaft) when a Docker engine answers;
3. otherwise :class:`app.dev.localkafka.LocalKafka` on free ports with a fresh data dir.

``BYZGUARD_KAFKA_VERSION`` picks the Kafka version (default :data:`app.dev.localkafka.DEFAULT_VERSION`);
``BYZGUARD_TEST_KAFKA=local|docker`` forces a backend. Tests that need the broker are marked
``@pytest.mark.kafka`` (the marker is declared in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import pytest

# The repo is not installed into the venv; make `app` / `byzguard` importable for every test.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from app.dev.localkafka import (  # noqa: E402
    FAST_START_JVM_FLAGS,
    LocalKafka,
    free_ports,
    new_cluster_id,
    resolve_version,
    wait_for_kafka,
)

T = TypeVar("T")

BACKEND_ENV = "BYZGUARD_TEST_KAFKA"


def pytest_configure(config: pytest.Config) -> None:
    """Declare the ``kafka`` marker even when pytest runs without this repo's pyproject."""
    config.addinivalue_line(
        "markers", "kafka: needs a real Kafka broker (started by the suite when none is configured)"
    )


# BYZGUARD_* variables of the test harness itself (which broker, where its download is cached, topics kept to
# look at, a chaos seed to replay): chosen on purpose, and none changes what a test asserts.
HARNESS_VARIABLES = frozenset({
    "BYZGUARD_KAFKA_VERSION", "BYZGUARD_CACHE_DIR", "BYZGUARD_TEST_KAFKA", "BYZGUARD_KEEP_TOPICS",
    "BYZGUARD_CHAOS_SEED",
})


def clear_developer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove the developer's BYZGUARD_* settings and stop .env from being read, in this process and in the
    workers and commands a test starts (BYZGUARD_ENV_FILE=""). KAFKA_BOOTSTRAP_SERVERS (the shared broker)
    and the harness's own variables stay."""
    for name in list(os.environ):
        if name.startswith("BYZGUARD_") and name not in HARNESS_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("BYZGUARD_ENV_FILE", "")
    settings = sys.modules.get("app.settings")
    if settings is not None:  # imported earlier: its Settings class read BYZGUARD_ENV_FILE then
        monkeypatch.setitem(settings.Settings.model_config, "env_file", None)


@pytest.fixture(autouse=True)
def no_developer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without the developer's BYZGUARD_* settings or .env; a test sets what it needs."""
    clear_developer_settings(monkeypatch)


def run_async(factory: Callable[[], Coroutine[Any, Any, T]], timeout: float = 120.0) -> T:
    """Run a coroutine to completion on a private loop in a worker thread (safe from any context)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="conftest-async") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result(timeout)


# --------------------------------------------------------------------------- programs the suite runs

#: BYZGUARD_TEST_CLIENTS=optional, read when this module is imported (before the autouse fixture above clears
#: BYZGUARD_* variables): a program the suite runs and `make test` installs (kcat, node and the TypeScript producer,
#: promtool, Chromium, java and mvn) skips the tests that need it when it is missing, instead of failing them.
OPTIONAL_PROGRAMS = os.environ.get("BYZGUARD_TEST_CLIENTS") == "optional"


def missing(what: str) -> NoReturn:
    """Fail (or, with BYZGUARD_TEST_CLIENTS=optional, skip) a test because a program it runs is not installed: CI
    installs every one (`make test`), so a test without its program must not pass unseen as a skip."""
    message = f"{what}; BYZGUARD_TEST_CLIENTS=optional skips"
    if OPTIONAL_PROGRAMS:
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def require(program: str, installs: str) -> str:
    """The path of `program` on PATH; missing() saying what installs it (`installs`) when there is none."""
    found = shutil.which(program)
    if found is None:
        missing(f"{program} is not installed ({installs})")
    return found


@pytest.fixture
def jvm() -> None:
    """java and mvn, which the local broker runs on and fetches its jars with (`make test` needs both)."""
    require("java", "a JDK or JRE 17+; the local broker runs on it")
    require("mvn", "Maven; `make test` fetches the broker's jars with it")


# --------------------------------------------------------------------------- the broker


def _docker_answers(timeout: float = 3.0) -> bool:
    """True when a Docker engine answers a ping within *timeout* seconds (never raises)."""
    try:
        import docker

        client = docker.from_env(timeout=int(max(1, timeout)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        pass
    try:
        probe = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return probe.returncode == 0 and bool(probe.stdout.strip())
    except Exception:
        return False


@contextlib.contextmanager
def _container_kafka(version: str) -> Iterator[str]:
    """An ``apache/kafka:<version>`` container in KRaft mode; yields its bootstrap servers.

    testcontainers' ``KafkaContainer`` only knows Confluent images (its KRaft boot script and
    version check are cp-kafka specific), so the official image is configured through its
    ``KAFKA_*`` environment variables on a generic container with a pre-chosen host port. Clients
    use the PLAINTEXT listener advertised on the host port; the broker talks to itself (e.g.
    transaction markers) over the BROKER listener inside the container.
    """
    from testcontainers.core.container import DockerContainer

    host_port = free_ports(1)[0]
    container = DockerContainer(f"apache/kafka:{version}")
    try:
        host = container.get_docker_client().host()
    except Exception:
        host = "localhost"
    env = {
        "CLUSTER_ID": new_cluster_id(),
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://0.0.0.0:9092,BROKER://0.0.0.0:19092,CONTROLLER://0.0.0.0:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{host}:{host_port},BROKER://localhost:19092",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "BROKER",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "4",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS": "4",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_NUM_PARTITIONS": "1",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "true",
    }
    if int(version.split(".")[0]) >= 4:
        env["KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR"] = "1"
        env["KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR"] = "1"
    for key, value in env.items():
        container.with_env(key, value)
    container.with_bind_ports(9092, host_port)
    try:
        container.start()
        bootstrap = f"{host}:{host_port}"
        if not wait_for_kafka(bootstrap, 120):
            raise RuntimeError(f"apache/kafka:{version} container did not answer at {bootstrap}")
        yield bootstrap
    finally:
        with contextlib.suppress(Exception):
            container.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of the session's Kafka broker (external, container or local JVM)."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        yield external
        return
    version = resolve_version(None)
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower()
    with contextlib.ExitStack() as stack:
        bootstrap: str | None = None
        if backend == "docker" or (backend == "auto" and _docker_answers()):
            try:
                bootstrap = stack.enter_context(_container_kafka(version))
            except Exception as exc:
                if backend == "docker":
                    raise
                warnings.warn(f"Kafka container failed ({exc!r}); using a local broker", stacklevel=1)
        if bootstrap is None:
            data_dir = tmp_path_factory.mktemp("kafka") / "data"
            kafka = LocalKafka(version, data_dir=data_dir, fresh=True, jvm_flags=FAST_START_JVM_FLAGS)
            bootstrap = stack.enter_context(kafka).bootstrap_servers
        yield bootstrap


async def broker_auto_creates_topics(bootstrap: str) -> bool:
    """Whether the broker creates a topic that a metadata request names (`auto.create.topics.enable`): a test that
    shows some code creates no topic by asking about it proves nothing on a broker that never would."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        brokers = (await admin.describe_cluster())["brokers"]
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.BROKER, str(b["node_id"])) for b in brokers])
    finally:
        await admin.close()
    values = {entry[1] for response in described for resource in response.resources for entry in resource[4]
              if entry[0] == "auto.create.topics.enable"}
    return values == {"true"}


# --------------------------------------------------------------------------- topics


class TopicFactory(Protocol):
    """Creates a fresh, uniquely named topic and returns its name."""

    def __call__(self, partitions: int = 1, config: Mapping[str, str] | None = None, *, suffix: str = "") -> str: ...


async def _create_topic(bootstrap: str, name: str, partitions: int, config: Mapping[str, str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, 1, topic_configs=dict(config))], timeout_ms=30_000
        )
        for error in response.to_object().get("topic_errors", []):
            if error.get("error_code"):
                raise RuntimeError(f"creating topic {name!r} failed: {error}")
        # Wait until every partition has a leader so producers and consumers can use it at once.
        for _ in range(200):
            topics = await admin.describe_topics([name])
            parts = topics[0].get("partitions", []) if topics else []
            if (
                topics
                and not topics[0].get("error_code")
                and len(parts) == partitions
                and all(p.get("leader", -1) >= 0 for p in parts)
            ):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"topic {name!r} has no leader for every partition after 10 s")
    finally:
        await admin.close()


# A test claims the topics it makes (by name prefix, on a broker); they are deleted when its module ends (one
# listing and one delete request per module, not per test), so a shared broker does not pile up partitions run
# after run. Claims made outside a module (session fixtures) are deleted when the session ends.
_claims: dict[str, set[str]] | None = None
_session_claims: dict[str, set[str]] = {}


def claim_topics(bootstrap: str, prefix: str) -> str:
    """Delete every topic on *bootstrap* whose name starts with *prefix* once the running test's module ends;
    returns *prefix*. Give it a name made unique per test (a uuid in it): every topic of that name or beyond goes."""
    claims = _claims if _claims is not None else _session_claims
    claims.setdefault(bootstrap, set()).add(prefix)
    return prefix


def unique_name(kind: str, bootstrap: str) -> str:
    """``<kind>-<8 hex>``, claimed: an app id or topic name whose topics are deleted after the test's module."""
    return claim_topics(bootstrap, f"{kind}-{uuid.uuid4().hex[:8]}")


async def _delete_claimed(bootstrap: str, prefixes: set[str]) -> None:
    from bench.kafka import delete_topics  # the benchmark's topics go the same way

    await delete_topics(bootstrap, sorted(prefixes))


def _delete_all_claimed(claims: dict[str, set[str]]) -> None:
    """Best effort: a failed delete only warns (the names are unique, nothing else reads them)."""
    if os.environ.get("BYZGUARD_KEEP_TOPICS"):  # to look at what a failed test left
        return
    for bootstrap, prefixes in claims.items():
        host, _, port = bootstrap.split(",")[0].rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0).close()
        except OSError:
            continue  # a test's own broker, stopped with its topics
        try:
            run_async(lambda: _delete_claimed(bootstrap, prefixes), timeout=30)  # noqa: B023 (awaited at once)
        except Exception as exc:
            warnings.warn(f"could not delete the test topics {sorted(prefixes)}*: {exc!r}", stacklevel=1)


@pytest.fixture(autouse=True, scope="module")
def delete_claimed_topics() -> Iterator[None]:
    """The topics the module's tests and module fixtures claimed (:func:`claim_topics`) are deleted when its last
    test ended, after their fixtures (the workers that used them are stopped by then)."""
    global _claims
    _claims = {}
    try:
        yield
    finally:
        claims, _claims = _claims, None
        _delete_all_claimed(claims)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Claims made by session fixtures are deleted at the end of the session."""
    claims = dict(_session_claims)
    _session_claims.clear()
    _delete_all_claimed(claims)


def _topic_prefix(test_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", test_name).strip("-")[:80] or "topic"


@pytest.fixture
def topic_factory(kafka_bootstrap: str, request: pytest.FixtureRequest) -> TopicFactory:
    """Create fresh topics named ``<test name>-<uuid4 hex[:8]>``; they (and the topics named after them, such as
    ``<name>-receipts``) are deleted after the test's module."""
    prefix = _topic_prefix(request.node.name)

    def create(partitions: int = 1, config: Mapping[str, str] | None = None, *, suffix: str = "") -> str:
        name = claim_topics(kafka_bootstrap, f"{prefix}{'-' + suffix if suffix else ''}-{uuid.uuid4().hex[:8]}")
        run_async(lambda: _create_topic(kafka_bootstrap, name, partitions, config or {}))
        return name

    return create
