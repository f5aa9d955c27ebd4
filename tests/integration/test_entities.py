"""Last-known-good values on a real broker: two `byzguard run` workers of one group serve
GET /entities/{route}/{entity}, each answering for every entity with the value of the worker that owns it."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from app.entities import FORWARDED_HEADER, SERVED_BY_HEADER, entity_partition
from byzguard.client.lkg import LastKnownGoodUnavailable, NoVerifiedValue, get_last_known_good
from byzguard.stamp import Stamped, Stamper
from tests.conftest import _topic_prefix, run_async
from tests.integration.worker_harness import RouteNames, WorkerFactory, WorkerProcess, produce, wait_caught_up

pytestmark = pytest.mark.kafka

PARTITIONS = 4
RETENTION = 20.0
CONFIG = """\
keys:
  orders-1: {{source: orders, secret_env: BYZGUARD_KEY_ORDERS_1}}
  payments-1: {{source: payments, secret_env: BYZGUARD_KEY_PAYMENTS_1}}
last_good_retention: {retention}s
routes:
  - name: orders
    inputs: [{input}]
    verified_topic: {verified}
    quarantine_topic: {quarantine}
    partitions: {partitions}
    require_checksum: true
    types:
      order.confirmed: {{sources: [orders]}}
      stock.level: {{sources: [orders], max_age: 3s}}
"""


@dataclass
class Group:
    """Two workers of one consumer group, and the stamper of the `orders` source (one Lamport clock)."""

    factory: WorkerFactory
    names: RouteNames
    workers: list[WorkerProcess]
    orders: Stamper
    run: str

    def url(self, worker: WorkerProcess) -> str:
        return f"http://127.0.0.1:{worker.web_port}"

    def entity(self, name: str) -> str:
        return f"{self.run}-{name}"

    def send(self, *records: Stamped) -> None:
        """Produce and wait until the group has processed (and committed) everything."""
        bootstrap = self.factory.bootstrap
        run_async(lambda: produce(bootstrap, self.names.input, records))
        run_async(lambda: wait_caught_up(bootstrap, self.factory.app_id, [self.names.input], workers=self.workers))

    def order(self, name: str, version: int, data: dict[str, Any], *, age: float = 0.0,
              type: str = "order.confirmed") -> Stamped:
        return self.orders.binary(data, type=type, subject=self.entity(name), version=version,
                                  time=time.time() - age)


def get(url: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """GET a JSON view: (status, body, headers)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, orjson.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read()), dict(exc.headers)


def _spread_probes(run: str) -> list[str]:
    """Entity ids covering every partition."""
    probes: dict[int, str] = {}
    n = 0
    while len(probes) < PARTITIONS:
        probes.setdefault(entity_partition(f"{run}-probe-{n}", PARTITIONS), f"{run}-probe-{n}")
        n += 1
    return [probes[p] for p in range(PARTITIONS)]


def _wait_for_two_owners(group: Group, timeout: float = 60.0) -> None:
    """Until both workers answer for every partition (no 503) and each owns some of them."""
    deadline = time.monotonic() + timeout
    owners: set[str] = set()
    while time.monotonic() < deadline:
        answers = [get(f"{group.url(w)}/entities/orders/{probe}") for w in group.workers
                   for probe in _spread_probes(group.run)]
        owners = {body.get("served_by", "") for status, body, _ in answers if status == 404}
        if all(status == 404 for status, _, _ in answers) and len(owners) == 2:
            return
        time.sleep(0.5)
    raise AssertionError(f"the two workers never shared the partitions (owners seen: {owners})")


@pytest.fixture(scope="module")
def group(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    """Two workers sharing the route's 4 partitions."""
    factory = WorkerFactory(kafka_bootstrap, tmp_path_factory.mktemp("entities"), _topic_prefix("test_entities"))
    try:
        names = factory.configure(partitions=PARTITIONS)
        assert factory.config_path is not None
        factory.config_path.write_text(CONFIG.format(input=names.input, verified=names.verified,
                                                     quarantine=names.quarantine, partitions=PARTITIONS,
                                                     retention=RETENTION))
        workers = [factory.new_worker(name).start() for name in ("w1", "w2")]
        for worker in workers:
            worker.wait_ready()
            assert "runtime: batched" in worker.log_text(), worker.log_tail()
        found = Group(factory, names, workers, Stamper("orders"), uuid.uuid4().hex[:6])
        _wait_for_two_owners(found)
        yield found
    finally:
        factory.cleanup()


def test_quarantined_event_never_replaces_the_last_known_good(group: Group) -> None:
    """After two clean versions and a corrupted third, the entity's value is the second: verified, not the bad one."""
    bad = group.order("o-1", 3, {"total": 1})
    value = bytearray(bad.value)
    value[len(value) // 2] ^= 0x01  # corrupted after its checksum was computed: integrity.mismatch
    group.send(group.order("o-1", 1, {"total": 100}), group.order("o-1", 2, {"total": 120}),
               Stamped(bad.key, bytes(value), bad.headers, bad.event_id))
    status, body, _ = get(f"{group.url(group.workers[0])}/entities/orders/{group.entity('o-1')}")
    assert status == 200, body
    assert body["value"] == {"total": 120} and body["version"] == 2
    assert body["status"] == "fresh" and body["type"] == "order.confirmed" and body["verified_at"].endswith("Z")


def test_any_worker_answers_with_the_owners_value(group: Group) -> None:
    """A request to the worker that does not own the entity is forwarded: both workers give the owner's answer."""
    names = _spread_probes(group.run + "-spread")
    group.send(*[group.orders.binary({"n": i}, type="order.confirmed", subject=name, version=1, time=time.time())
                 for i, name in enumerate(names)])
    owners = set()
    for i, name in enumerate(names):
        answers = [get(f"{group.url(w)}/entities/orders/{name}") for w in group.workers]
        (s1, b1, h1), (s2, b2, h2) = answers
        assert (s1, s2) == (200, 200), answers
        same = {k: v for k, v in b1.items() if k != "age_seconds"}
        assert same == {k: v for k, v in b2.items() if k != "age_seconds"} and b1["value"] == {"n": i}
        assert b1["partition"] == entity_partition(name, PARTITIONS)
        assert h1[SERVED_BY_HEADER] == h2[SERVED_BY_HEADER] == b1["served_by"]
        owners.add(b1["served_by"])
    assert owners == {group.url(w) for w in group.workers}


def test_a_forwarded_request_is_never_forwarded_again(group: Group) -> None:
    """A request that already carries X-Byzguard-Forwarded-By is answered by the owner, and by any other worker with
    a 503 and Retry-After (ownership moved meanwhile), never sent on: no forwarding loops."""
    for name in _spread_probes(group.run + "-loop"):
        answers = []
        for worker in group.workers:
            request = urllib.request.Request(f"{group.url(worker)}/entities/orders/{name}",
                                             headers={FORWARDED_HEADER: "http://127.0.0.1:9"})
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    answers.append((resp.status, orjson.loads(resp.read()), dict(resp.headers)))
            except urllib.error.HTTPError as exc:
                answers.append((exc.code, orjson.loads(exc.read()), dict(exc.headers)))
        owner = [a for a in answers if a[0] == 404]
        other = [a for a in answers if a[0] == 503]
        assert len(owner) == len(other) == 1, answers
        assert owner[0][1]["error"] == "not_found" and owner[0][2][SERVED_BY_HEADER] == owner[0][1]["served_by"]
        assert other[0][1]["error"] == "unavailable" and other[0][2]["Retry-After"], other
        assert SERVED_BY_HEADER not in other[0][2], "the other worker answered itself, it did not forward"


def test_unknown_entity_or_route_is_404(group: Group) -> None:
    """An entity never verified is 404 not_found (from its owner); an unknown route is 404 too."""
    for worker in group.workers:
        status, body, _ = get(f"{group.url(worker)}/entities/orders/{group.entity('never-seen')}")
        assert (status, body["error"]) == (404, "not_found")
    status, body, _ = get(f"{group.url(group.workers[0])}/entities/nope/{group.entity('o-1')}")
    assert (status, body["error"], body["routes"]) == (404, "unknown_route", ["orders"])


def last_good_requests(group: Group) -> Counter[str]:
    """byzguard_last_good_requests_total of the orders route, summed over the workers, by outcome."""
    counts: Counter[str] = Counter()
    for worker in group.workers:
        with urllib.request.urlopen(f"{group.url(worker)}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "byzguard_last_good_requests_total" and sample.labels.get("route") == "orders":
                    counts[sample.labels["outcome"]] += sample.value
    return counts


def test_value_past_max_age_is_a_fallback_until_the_retention_ends(group: Group) -> None:
    """Past its type's max_age a value is served as a fallback (and counted); past the retention it is gone. The
    owner counts each answer by outcome in byzguard_last_good_requests_total (the group's other tests add theirs:
    the counts grow by at least this test's answers)."""
    before = last_good_requests(group)
    group.send(group.order("stock-1", 1, {"level": 7}, age=1.0, type="stock.level"),
               group.order("old-1", 1, {"total": 5}, age=RETENTION - 5))
    url = group.url(group.workers[1])
    asked = time.monotonic()
    status, old, _ = get(f"{url}/entities/orders/{group.entity('old-1')}")
    assert (status, old["status"]) == (200, "fresh"), old  # order.confirmed has no max_age: fresh until retention
    status, stock, _ = get(f"{url}/entities/orders/{group.entity('stock-1')}")
    assert status == 200, stock
    time.sleep(max(0.0, 3.2 - stock["age_seconds"]))  # stock.level's max_age is 3 s
    status, stock, _ = get(f"{url}/entities/orders/{group.entity('stock-1')}")
    assert (status, stock["status"], stock["fresh"], stock["value"]) == (200, "fallback", False, {"level": 7})
    with pytest.raises(NoVerifiedValue, match="stale fallback"):
        get_last_known_good(url, "orders", group.entity("stock-1"), require_fresh=True)
    fallback = get_last_known_good(url, "orders", group.entity("stock-1"))
    assert fallback is not None and fallback.is_fallback and fallback.value == {"level": 7}
    assert sum(w.metrics().get("byzguard_last_good_served_total", 0.0) for w in group.workers) >= 2
    time.sleep(max(0.0, RETENTION + 0.3 - old["age_seconds"] - (time.monotonic() - asked)))
    status, old, _ = get(f"{url}/entities/orders/{group.entity('old-1')}")
    assert (status, old["error"]) == (404, "expired")
    assert get_last_known_good(url, "orders", group.entity("old-1"), fail_closed=False) is None
    grown = last_good_requests(group)
    grown.subtract(before)
    # fresh: old-1 and stock-1 once each; fallback: stock-1 by URL, the two client calls; expired: old-1 twice.
    assert grown["fresh"] >= 2 and grown["fallback"] >= 3 and grown["expired"] >= 2, grown


def test_client_fails_closed_without_a_verified_value(group: Group) -> None:
    """The Python client returns verified values only; without one it raises (fail closed) or gives None."""
    group.send(group.order("o-client", 1, {"total": 42}))
    url = group.url(group.workers[0])
    good = get_last_known_good(url, "orders", group.entity("o-client"))
    assert good is not None and good.value == {"total": 42} and good.version == 1 and good.fresh
    with pytest.raises(NoVerifiedValue):
        get_last_known_good(url, "orders", group.entity("never-seen"))
    assert get_last_known_good(url, "orders", group.entity("never-seen"), fail_closed=False) is None
    with pytest.raises(LastKnownGoodUnavailable):
        get_last_known_good("http://127.0.0.1:9", "orders", group.entity("o-client"), timeout=1)
    assert get_last_known_good("http://127.0.0.1:9", "orders", "x", fail_closed=False, timeout=1) is None


def test_raw_table_views_are_not_served(group: Group) -> None:
    """faust's /table/ views (raw entity state, no token) answer 404 on every worker, for the table list, the
    state table and an entity that has state; the entity's value is served by /entities/ as documented."""
    group.send(group.order("o-raw", 1, {"total": 7}))
    table = "orders-state_by_entity"  # tables.table_names: what faust's views would have served
    for worker in group.workers:
        for path in ("/table/", f"/table/{table}/", f"/table/{table}/{group.entity('o-raw')}/"):
            try:
                with urllib.request.urlopen(f"{group.url(worker)}{path}", timeout=10) as resp:
                    raise AssertionError(f"{path} answered {resp.status}: {resp.read()[:200]!r}")
            except urllib.error.HTTPError as exc:
                assert exc.code == 404, (path, exc.code)
        status, body, _ = get(f"{group.url(worker)}/entities/orders/{group.entity('o-raw')}")
        assert (status, body["value"]) == (200, {"total": 7})


#: Changelog records before the entities' own in each partition: enough for a restore to take a second or more
#: (the batched runtime restores tens of thousands of records a second here).
FILLER_PER_PARTITION = 40_000


async def _fill_changelog(bootstrap: str, topic: str, partitions: int, per_partition: int) -> None:
    """Append `per_partition` records of keys no event has to each partition of an entity state changelog, so a
    worker that restores it from the beginning takes a while before it reaches the entities' own records."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=512 * 1024)
    await producer.start()
    try:
        value = b"\x00" * 100
        for partition in range(partitions):
            batch = producer.create_batch()
            for n in range(per_partition):
                key = f"filler-{partition}-{n}".encode()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    await (await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()


def test_answers_503_while_the_owner_restores_the_partition(worker_factory: WorkerFactory) -> None:
    """While a second worker joins and restores the partitions it takes over (tens of thousands of changelog records
    before the entities' own), every answer from either worker is the verified value or a 503 with Retry-After,
    never a not_found read from a half-restored state; afterwards both workers answer with the value again."""
    names = worker_factory.configure(partitions=PARTITIONS)
    assert worker_factory.config_path is not None
    worker_factory.config_path.write_text(CONFIG.format(
        input=names.input, verified=names.verified, quarantine=names.quarantine, partitions=PARTITIONS,
        retention=3600))
    first = worker_factory.start("w1")
    assert "runtime: batched" in first.log_text(), first.log_tail()
    bootstrap = worker_factory.bootstrap
    changelog = f"{worker_factory.app_id}-orders-state_by_entity-changelog"
    run_async(lambda: _fill_changelog(bootstrap, changelog, PARTITIONS, FILLER_PER_PARTITION))
    orders, run = Stamper("orders"), uuid.uuid4().hex[:6]
    probes = _spread_probes(run)  # one entity per partition, its state after the filler in the changelog
    records = [orders.binary({"n": i}, type="order.confirmed", subject=name, version=1, time=time.time())
               for i, name in enumerate(probes)]
    run_async(lambda: produce(bootstrap, names.input, records))
    run_async(lambda: wait_caught_up(bootstrap, worker_factory.app_id, [names.input], workers=[first]))
    urls = [f"http://127.0.0.1:{first.web_port}"]
    for i, name in enumerate(probes):
        status, body, _ = get(f"{urls[0]}/entities/orders/{name}")
        assert (status, body.get("value")) == (200, {"n": i}), body

    second = worker_factory.new_worker("w2").start()  # its own, empty data dir: it restores what it takes over
    urls.append(f"http://127.0.0.1:{second.web_port}")
    unavailable, wrong = 0, []
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, f"the workers never both answered again: {unavailable} 503s"
        owners, settled = set(), True
        for url in urls:
            for i, name in enumerate(probes):
                try:
                    status, body, headers = get(f"{url}/entities/orders/{name}")
                except (urllib.error.URLError, ConnectionError):  # the second worker's web server is not up yet
                    settled = False
                    continue
                if status == 503 and headers.get("Retry-After") and body["error"] == "unavailable":
                    unavailable += 1
                    settled = False
                elif status == 200 and body["value"] == {"n": i}:
                    owners.add(body["served_by"])
                else:
                    wrong.append((url, name, status, body))
        assert not wrong, wrong
        if settled and len(owners) == 2:
            break
        time.sleep(0.05)
    assert unavailable > 0, "no answer was ever a 503 while the partitions moved"
    assert "restored" in second.log_text(), second.log_tail()
