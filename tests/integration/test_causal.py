"""Causal delivery against the real broker: reordered streams come out in causal order, complete;
a dependency that never arrives quarantines exactly its dependents; a SIGKILL loses and repeats nothing."""

from __future__ import annotations

import random
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from byzguard.clocks import VectorClock
from byzguard.stamp import Stamped, Stamper
from tests.conftest import run_async
from tests.integration.worker_harness import RouteNames, WorkerFactory, WorkerProcess, collect, produce, wait_caught_up

pytestmark = pytest.mark.kafka

CONFIG = """\
routes:
  - name: docs
    inputs: [{input}]
    verified_topic: {verified}
    quarantine_topic: {quarantine}
    partitions: 2
    default_type: doc.edited
    causal: {{buffer: true, deadline: {deadline}}}
    types:
      doc.edited:
        codes: {{vclock.concurrent: off}}   # several writers edit concurrently; causality is what matters
"""


def configure(factory: WorkerFactory, deadline: str = "60s") -> RouteNames:
    """A route with causal buffering on fresh topics."""
    route = factory.configure(partitions=2)
    assert factory.config_path is not None
    factory.config_path.write_text(CONFIG.format(input=route.input, verified=route.verified,
                                                 quarantine=route.quarantine, deadline=deadline))
    return route


def history(entity: str, events: int, rng: random.Random) -> list[Stamped]:
    """A causal history of one entity edited by three writers that usually read the latest state first."""
    seen = {w: VectorClock() for w in ("w0", "w1", "w2")}
    log: list[Stamped] = []
    for n in range(events):
        writer = rng.choice(sorted(seen))
        if log and rng.random() < 0.7:
            seen[writer] = seen[writer].merge(clock_of(log[-1]))
        seen[writer] = seen[writer].tick(writer)
        log.append(Stamper(writer).binary({"n": n}, type="doc.edited", subject=entity, vclock=seen[writer],
                                          lamport=False, event_id=f"{entity}-e{n}"))
    return log


def clock_of(s: Stamped) -> VectorClock:
    """The vector clock a stamped record carries."""
    return VectorClock.from_header(dict(s.headers)["ce_vectorclock"])


def reorder(records: list[Stamped], rng: random.Random, window: int = 3) -> list[Stamped]:
    """Swap each record with one at most `window` places later: the bus delivers out of order."""
    out = list(records)
    for i in range(len(out)):
        j = min(len(out) - 1, i + rng.randrange(window + 1))
        out[i], out[j] = out[j], out[i]
    return out


def assert_causal(verified_ids: list[str], log: list[Stamped]) -> None:
    """Every event appears once, after every event that happened before it."""
    assert sorted(verified_ids) == sorted(s.event_id for s in log)
    position = {event_id: i for i, event_id in enumerate(verified_ids)}
    for a in log:
        for b in log:
            if clock_of(b).dominates(clock_of(a)):
                assert position[a.event_id] < position[b.event_id], (a.event_id, b.event_id)


def test_reordered_stream_is_delivered_complete_in_causal_order(worker_factory: WorkerFactory) -> None:
    """Events reordered within a window reach the verified topic complete, causally ordered, none quarantined."""
    route = configure(worker_factory)
    worker_factory.start("w1")
    rng = random.Random(7)
    logs = {f"doc-{i}": history(f"doc-{i}", 25, rng) for i in range(4)}
    sent = [s for log in logs.values() for s in reorder(log, rng)]
    rng.shuffle(sent)  # entities interleave too; each entity's own order is the reordered one
    order_per_entity = {e: [s for s in sent if s.key == e.encode()] for e in logs}
    for records in order_per_entity.values():
        run_async(lambda r=records: produce(worker_factory.bootstrap, route.input, r))
    verified = run_async(lambda: collect(worker_factory.bootstrap, route.verified, expected=len(sent)))
    quarantined = run_async(lambda: collect(worker_factory.bootstrap, route.quarantine, idle=1.0))
    assert quarantined == []
    for entity, log in logs.items():
        ids = [o.event_id for o in sorted(verified, key=lambda o: o.offset) if o.key == entity.encode()]
        assert_causal(ids, log)


def test_missing_dependency_quarantines_exactly_its_dependents(worker_factory: WorkerFactory) -> None:
    """A dependency that never arrives: after the deadline, exactly the events waiting on it are causal.gap."""
    # The gauges can only be seen while the dependents wait, i.e. within the deadline: 3 s was missed twice in CI
    # on the loaded 2-core machine (the last poll saw (0, False); the cause is not known), so the window is 8 s.
    route = configure(worker_factory, deadline="8s")
    worker = worker_factory.start("w1")
    log = history("doc-x", 12, random.Random(3))
    lost = log[5]
    dependents = {s.event_id for s in log if clock_of(s).dominates(clock_of(lost))}
    assert dependents
    run_async(lambda: produce(worker_factory.bootstrap, route.input, [s for s in log if s is not lost]))
    # While they wait, the buffer gauges show them (the age is updated by the deadline ticks).
    assert eventually(lambda: gauges(worker) == (len(dependents), True)), gauges(worker)
    expected_ok = len(log) - 1 - len(dependents)
    quarantined = run_async(lambda: collect(worker_factory.bootstrap, route.quarantine,
                                            expected=len(dependents), timeout=60))
    verified = run_async(lambda: collect(worker_factory.bootstrap, route.verified, expected=expected_ok))
    assert {o.event_id for o in quarantined} == dependents
    assert all(o.codes == {"causal.gap"} for o in quarantined)
    lost_source = dict(lost.headers)["ce_source"].decode()
    lost_counter = clock_of(lost).get(lost_source)
    # Each dependent names the lost event's source among what it still misses.
    assert all(f"{lost_source} " in o.reasons[0]["detail"] for o in quarantined), lost_counter
    assert {o.event_id for o in verified} == {s.event_id for s in log} - dependents - {lost.event_id}
    assert eventually(lambda: gauges(worker) == (0, False)), gauges(worker)
    # Counted under the event's type and source label (its writers are not configured sources: "other").
    gaps = samples(worker, "byzguard_check_failures_total", code="causal.gap")
    assert {(labels["source"], value) for labels, value in gaps} == {("other", float(len(dependents)))}
    quarantined_events = samples(worker, "byzguard_events_total", outcome="quarantined")
    assert {(labels["type"], value) for labels, value in quarantined_events} == {("doc.edited",
                                                                                  float(len(dependents)))}


def samples(worker: WorkerProcess, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric `name` on `worker` whose labels include `match`, with all their labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [(dict(sample.labels), sample.value) for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items())]


def gauges(worker: WorkerProcess) -> tuple[float, bool]:
    """(events held, whether the oldest has waited > 0 s) from the worker's causal buffer gauges."""
    metrics = worker.metrics()
    return (metrics.get("byzguard_causal_buffer_events", -1.0),
            metrics.get("byzguard_causal_buffer_oldest_age_seconds", 0.0) > 0)


def eventually(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` s have passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_sigkill_while_events_are_held_loses_and_repeats_nothing(worker_factory: WorkerFactory,
                                                                 tmp_path: Path) -> None:
    """Held events survive a SIGKILL: after restart and the missing events' arrival each is delivered once."""
    route = configure(worker_factory)
    data_dir = tmp_path / "w-data"
    worker = worker_factory.start("w1", data_dir=data_dir)
    log = history("doc-k", 16, random.Random(11))
    early, late = log[4:], log[:4]
    run_async(lambda: produce(worker_factory.bootstrap, route.input, early))
    run_async(lambda: wait_caught_up(worker_factory.bootstrap, worker_factory.app_id, [route.input],
                                     workers=[worker]))
    time.sleep(0.5)
    worker.kill()
    worker_factory.start("w2", data_dir=data_dir)
    run_async(lambda: produce(worker_factory.bootstrap, route.input, late))
    verified = run_async(lambda: collect(worker_factory.bootstrap, route.verified, expected=len(log)))
    assert_causal([o.event_id for o in sorted(verified, key=lambda o: o.offset)], log)
    assert run_async(lambda: collect(worker_factory.bootstrap, route.quarantine, idle=1.0)) == []


def test_buffer_gauges_follow_held_events_across_a_rebalance_and_a_stop(worker_factory: WorkerFactory) -> None:
    """The held-events gauge counts what each worker's partitions hold: split over two workers after a
    rebalance, all of it on the survivor after a clean stop (restored from state), and 0, never below, once
    the missing events arrive."""
    route = configure(worker_factory)
    w1 = worker_factory.start("w1")
    rng = random.Random(5)
    logs = [history(f"doc-{i}", 10, rng) for i in range(6)]
    early = [s for log in logs for s in log[3:]]
    late = [s for log in logs for s in log[:3]]
    run_async(lambda: produce(worker_factory.bootstrap, route.input, early))
    run_async(lambda: wait_caught_up(worker_factory.bootstrap, worker_factory.app_id, [route.input], workers=[w1]))
    delivered = run_async(lambda: collect(worker_factory.bootstrap, route.verified, idle=1.0))
    held = len(early) - len(delivered)
    assert held > 0
    assert eventually(lambda: held_gauge(w1) == held), held_gauge(w1)
    w2 = worker_factory.start("w2")
    both = (w1, w2)
    assert eventually(lambda: [held_gauge(w) for w in both] != [held, 0]
                      and sum(held_gauge(w) for w in both) == held, timeout=60), [held_gauge(w) for w in both]
    w1.stop()
    assert eventually(lambda: held_gauge(w2) == held, timeout=60), held_gauge(w2)
    run_async(lambda: produce(worker_factory.bootstrap, route.input, late))
    verified = run_async(lambda: collect(worker_factory.bootstrap, route.verified, expected=len(early) + len(late)))
    assert len(verified) == len(early) + len(late)
    assert eventually(lambda: gauges(w2) == (0, False)), gauges(w2)


def held_gauge(worker: WorkerProcess) -> float:
    """byzguard_causal_buffer_events of one worker (-1 while its metrics cannot be read)."""
    return worker.metrics().get("byzguard_causal_buffer_events", -1.0)
