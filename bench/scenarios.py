"""One run of each kind: throughput over a pre-produced input, latency under paced load, memory, profile."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import events, latency_clients
from bench.kafka import Progress, Record, create_topics, produce, scan
from bench.procs import Worker, cpu_seconds, loadavg, machine_cpu
from bench.variants import Launch, Variant, free_port, launch


@dataclass
class Context:
    """What every run needs: the broker, the shared input and where to put files."""

    bootstrap: str
    broker_pid: int | None
    partitions: int
    workdir: Path
    repo: Path
    causal_buffer: bool = False
    #: Extra BYZGUARD_* settings of every worker (--setting), shown in each run's command.
    settings: dict[str, str] = field(default_factory=dict)

    def launch(self, variant: Variant, run_id: str, input_topic: str, **kw: Any) -> Launch:
        return launch(variant, run_id=run_id, bootstrap=self.bootstrap, input_topic=input_topic,
                      partitions=self.partitions, workdir=self.workdir, repo=self.repo,
                      causal_buffer=self.causal_buffer, extra_env=self.settings, **kw)


class Meter:
    """CPU of the worker, the broker and the whole machine, and the load average, over one run."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.load_start = loadavg()
        self.machine_start = machine_cpu()
        self.broker_start = cpu_seconds(ctx.broker_pid) if ctx.broker_pid else None

    def finish(self, worker_cpu: float | None) -> dict[str, Any]:
        busy0, total0 = self.machine_start
        busy1, total1 = machine_cpu()
        broker = cpu_seconds(self.ctx.broker_pid) if self.ctx.broker_pid else None
        broker_cpu = broker - self.broker_start if broker is not None and self.broker_start is not None else None
        machine_busy = busy1 - busy0
        # Everything else the machine did meanwhile: other engineers' tests, this harness, the kernel.
        other = machine_busy - (worker_cpu or 0.0) - (broker_cpu or 0.0)
        wall = (total1 - total0) / max(1, _cores())
        return {
            "loadavg_start": self.load_start, "loadavg_end": loadavg(),
            "machine_busy_cores": round(machine_busy / wall, 2) if wall > 0 else None,
            "broker_cpu_s": round(broker_cpu, 2) if broker_cpu is not None else None,
            "other_cpu_cores": round(other / wall, 2) if wall > 0 else None,
        }


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def seq_of(headers: Any) -> int | None:
    """The input sequence number an output record carries (events.SEQ_HEADER), None without one."""
    for k, v in headers or ():
        if k == events.SEQ_HEADER:
            return int(v)
    return None


def timed_span(samples: list[tuple[int, int | None]], timed_from: int) -> tuple[int, int | None, int | None]:
    """(count, first, last timestamp in ms) of the outputs whose input sequence number is >= `timed_from`, from
    (timestamp ms, seq) samples: the timed part of a steady-state input (the history before it is left out)."""
    timed = [ts for ts, seq in samples if seq is not None and seq >= timed_from]
    if not timed:
        return 0, None, None
    return len(timed), min(timed), max(timed)


async def throughput(ctx: Context, variant: Variant, run_id: str, input_topic: str, expected: int, *,
                     timeout: float, timed_from: int = 0) -> dict[str, Any]:
    """Run `variant` over the pre-produced input; events/s between the first and last output append times.

    `timed_from` > 0 (a steady-state input): the first `timed_from` input events are the entities' history,
    processed but not timed; events/s and CPU per event are those of the outputs of the later events only."""
    lnch = ctx.launch(variant, run_id, input_topic)
    await lnch.create_topics(ctx.bootstrap, ctx.partitions)
    meter = Meter(ctx)
    worker = lnch.worker.start()
    started = time.monotonic()
    cpu_first: float | None = None
    out_first = 0
    t_first: float | None = None
    done_at: float | None = None
    cpu_done: float | None = None
    error = None
    try:
        async with Progress(ctx.bootstrap) as progress:
            last_out, stable_since = -1, time.monotonic()
            while True:
                worker.check()
                worker.sample()
                out = sum((await progress.end_offsets(lnch.outputs)).values())
                if out > timed_from and cpu_first is None:
                    cpu_first, out_first, t_first = worker.cpu(), out, time.monotonic()
                committed = await progress.committed(lnch.group, input_topic)
                now = time.monotonic()
                if out != last_out:
                    last_out, stable_since = out, now
                if committed >= expected and out > 0 and now - stable_since >= 1.5:
                    done_at, cpu_done = now, worker.cpu()
                    break
                if now - started > timeout:
                    error = f"timed out after {timeout:.0f} s: committed {committed}/{expected}, outputs {out}"
                    cpu_done = worker.cpu()
                    break
                await asyncio.sleep(0.25)
    except Exception as exc:
        error = str(exc)
    finally:
        worker.stop()
    host = meter.finish(cpu_done - (cpu_first or 0.0) if cpu_done is not None and cpu_first is not None else None)
    keep = (lambda m: (m.timestamp, seq_of(m.headers))) if timed_from else None
    outputs = await scan(ctx.bootstrap, lnch.outputs, read_committed=True, keep=keep)
    count = sum(o.count for o in outputs.values())
    firsts = [o.first_ts_ms for o in outputs.values() if o.first_ts_ms is not None]
    lasts = [o.last_ts_ms for o in outputs.values() if o.last_ts_ms is not None]
    span = (max(lasts) - min(firsts)) / 1000 if firsts and lasts else None
    all_count = count
    if timed_from:
        count, first_ms, last_ms = timed_span([r for o in outputs.values() for r in o.records], timed_from)
        span = (last_ms - first_ms) / 1000 if first_ms is not None and last_ms is not None else None
        out_first = max(0, out_first - timed_from)
    ts_types = sorted({t for o in outputs.values() for t in o.timestamp_types})
    per_event_cpu = None
    if cpu_done is not None and cpu_first is not None and count > out_first:
        per_event_cpu = (cpu_done - cpu_first) / (count - out_first) * 1e6
    result = {
        "variant": variant.key, "run_id": run_id, "command": lnch.command,
        "config": str(lnch.config_path) if lnch.config_path else None,
        "input_events": expected, "outputs": {t: o.count for t, o in outputs.items()}, "output_events": all_count,
        "timed_from_seq": timed_from, "timed_output_events": count,
        "span_s": round(span, 3) if span else None,
        "events_per_s": round((count - 1) / span, 1) if span and count > 1 else None,
        "wall_incl_startup_s": round((done_at or time.monotonic()) - started, 1),
        "startup_to_first_output_s": round(t_first - started, 1) if t_first else None,
        "worker_cpu_us_per_event": round(per_event_cpu, 1) if per_event_cpu else None,
        "worker_peak_rss_mb": round(worker.peak_rss / 2**20, 1),
        "timestamp_types": ts_types,  # 1 = LogAppendTime (broker clock), as created
        "host": host, "error": error,
    }
    if all_count != expected and not error:
        result["error"] = f"expected {expected} output events, found {all_count}"
    _cleanup(worker)
    return result


def _cleanup(worker: Worker) -> None:
    state = worker.cwd / "state"
    if state.exists():
        shutil.rmtree(state, ignore_errors=True)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-q / 100 * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


async def latency(ctx: Context, variant: Variant, run_id: str, records: list[Record], *, warmup: int,
                  rate: float, timeout: float, settle: float = 0.0, reader_wait_ms: int = 100,
                  client: str = "aiokafka") -> dict[str, Any]:
    """Send `records` at `rate`/s (after `warmup` unpaced ones) and time each from send to the verified topic.

    `reader_wait_ms`: the reader's fetch_max_wait_ms (how long the broker holds its fetch when nothing is readable).
    `client`: the paced producer's and the reader's client library (bench/latency_clients.py: aiokafka or
    confluent); the timing is the same with both.

    The first `settle` seconds of the paced load are sent and timed like the rest, but left out of the
    percentiles: every variant, raw aiokafka included, starts the paced load with a few hundred milliseconds of
    slow outputs (the aftermath of the unpaced warm-up), which alone are about 1% of a 60 s run."""
    input_topic = f"{run_id}-in"
    lnch = ctx.launch(variant, run_id, input_topic)
    await create_topics(ctx.bootstrap, [input_topic], ctx.partitions)
    await lnch.create_topics(ctx.bootstrap, ctx.partitions)
    meter = Meter(ctx)
    target = lnch.outputs[0]  # the verified topic (or the pass-through's output)
    pair = latency_clients.clients(client, ctx.bootstrap, read_committed=variant.read_committed,
                                   reader_wait_ms=reader_wait_ms)
    # The clients first: a client that fails to start then leaves no worker running.
    await pair.start()
    worker = lnch.worker.start()
    latencies: list[float] = []
    sent_ns: list[int] = []  # send time of each latency sample, to see whether slow ones come in bursts
    # The output's broker append time (the outputs are LogAppendTime topics) minus the send time, ms: the trip up
    # to the worker's output landing, without the bench reader's fetch of it.
    appended: list[float] = []
    seen = 0
    loop = asyncio.get_running_loop()
    warm_seen = asyncio.Event()
    all_seen = asyncio.Event()
    paced = len(records) - warmup
    error = None
    cpu0 = cpu1 = None
    harness0 = harness1 = None

    def on_output(now_ns: int, sent: bytes | None, timestamp_ms: int) -> None:
        nonlocal seen
        seen += 1
        if sent is not None:
            latencies.append((now_ns - int(sent)) / 1e6)
            sent_ns.append(int(sent))
            appended.append(timestamp_ms - int(sent) / 1e6)

    def after_fetch() -> bool:  # in the reader's thread (confluent) or on the loop (aiokafka)
        if seen >= warmup and not warm_seen.is_set():
            loop.call_soon_threadsafe(warm_seen.set)
        if seen >= len(records):
            loop.call_soon_threadsafe(all_seen.set)
            return True
        return False

    reader = asyncio.create_task(pair.read(target, ctx.partitions, on_output, after_fetch))
    sent_at: list[float] = []
    try:
        for key, value, headers in records[:warmup]:
            await pair.send(input_topic, value, key, headers)
        await pair.flush()
        await _wait(worker, warm_seen, timeout, reader)
        cpu0 = worker.cpu()
        harness0 = time.process_time()
        start = time.monotonic()
        interval = 1.0 / rate
        for i, (key, value, headers) in enumerate(records[warmup:]):
            due = start + i * interval
            delay = due - time.monotonic()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            sent_at.append(time.monotonic())
            await pair.send(input_topic, value, key, [*headers, (events.SENT_HEADER, str(time.time_ns()).encode())])
        await pair.flush()
        await _wait(worker, all_seen, timeout, reader)
        cpu1 = worker.cpu()
        harness1 = time.process_time()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            with contextlib.suppress(Exception):
                await pair.stop()
            worker.sample()
        finally:
            worker.stop()
    host = meter.finish(cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None)
    first_ns = min(sent_ns) if sent_ns else 0
    measured_from = first_ns + int(settle * 1e9)
    values = sorted(ms for ms, ns in zip(latencies, sent_ns, strict=True) if ns >= measured_from)
    # Every sample, for a look at how the slow ones spread over time (seconds into the load, ms; measured: 0
    # for the settling period left out of the percentiles).
    # appended_ms: to the output's broker append time (1 ms resolution); latency_ms - appended_ms is the reader's part.
    (ctx.workdir / run_id / "latency-samples.csv").write_text("sent_s,latency_ms,measured,appended_ms\n" + "".join(
        f"{(ns - first_ns) / 1e9:.4f},{ms:.2f},{int(ns >= measured_from)},{app:.1f}\n"
        for ms, ns, app in zip(latencies, sent_ns, appended, strict=True)))
    to_append = sorted(app for app, ns in zip(appended, sent_ns, strict=True) if ns >= measured_from)
    read_part = sorted(ms - app for ms, app, ns in zip(latencies, appended, sent_ns, strict=True)
                       if ns >= measured_from)
    worst = sorted(((ms, ns) for ms, ns in zip(latencies, sent_ns, strict=True) if ns >= measured_from),
                   reverse=True)[:40]
    achieved = (len(sent_at) - 1) / (sent_at[-1] - sent_at[0]) if len(sent_at) > 1 else None
    _cleanup(worker)
    return {
        "variant": variant.key, "run_id": run_id, "command": lnch.command, "rate_target": round(rate, 1),
        "rate_achieved": round(achieved, 1) if achieved else None, "warmup_events": warmup, "paced_events": paced,
        "settle_s": settle, "reader_wait_ms": reader_wait_ms, "client": pair.kind,
        "settle_samples": len(latencies) - len(values),
        "samples": len(values),
        "missing": paced - len(latencies),
        "p50_ms": _r(percentile(values, 50)), "p90_ms": _r(percentile(values, 90)),
        "p99_ms": _r(percentile(values, 99)), "p999_ms": _r(percentile(values, 99.9)),
        "max_ms": _r(values[-1] if values else None),
        # Send to the output's broker append time (the worker's part and the input's broker), and from there to the
        # bench reader (its fetch): p50 / p99 of each.
        "appended_p50_ms": _r(percentile(to_append, 50)), "appended_p99_ms": _r(percentile(to_append, 99)),
        "reader_p50_ms": _r(percentile(read_part, 50)), "reader_p99_ms": _r(percentile(read_part, 99)),
        # The 40 slowest samples: (seconds into the paced load, ms). Periodic spikes point at periodic work.
        "worst": [(round((ns - first_ns) / 1e9, 3), round(ms, 1)) for ms, ns in worst],
        # Wall-clock time of the first paced send (the 0 of `worst` and latency-samples.csv), to match worker logs.
        "first_sent_unix": round(first_ns / 1e9, 3) if first_ns else None,
        "worker_cpu_share": round((cpu1 - cpu0) / (sent_at[-1] - sent_at[0]), 2)
        if cpu0 is not None and cpu1 is not None and len(sent_at) > 1 else None,
        # The bench process's own CPU (its paced producer and reader, every thread) per paced event, µs.
        "harness_cpu_us_per_event": round((harness1 - harness0) / paced * 1e6, 1)
        if harness0 is not None and harness1 is not None and paced > 0 else None,
        "host": host, "error": error,
    }


def _r(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


async def _wait(worker: Worker, event: asyncio.Event, timeout: float,
                reader: asyncio.Future[None] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not event.is_set():
        worker.check()
        if reader is not None and reader.done() and not event.is_set():
            reader.result()  # the reader failed: its error
            raise RuntimeError("the reader stopped before every output came")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete output after {timeout:.0f} s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), 0.5)


def entity_states(count: int, *, at: float, mode: str, prefix: str, ids: int = 1) -> Any:
    """(key, state bytes, no headers) of `count` entities after one verified event each, computed by the guard
    itself; with `ids` > 1, each entity's record then holds `ids` recent ids (at most the config's
    ids_per_entity, 32), as after `ids` verified events (versions 1..ids: their rows are built by
    byzguard.state.new_entries, as the guard builds them, without verifying `ids` events per entity)."""
    from dataclasses import replace

    from byzguard.clocks import VectorClock
    from byzguard.config import load
    from byzguard.guard import ENTITIES, Guard, RecordIn
    from byzguard.state import EntityState, new_entries

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        config = load(events.write_config(Path(tmp) / "bench.yaml", repo=Path(__file__).resolve().parent.parent,
                                          input_topic="in", verified="v", quarantine="q", partitions=1, rules=False),
                      environ=events.secret_env())
    guard, route = Guard(config), config.routes[0]
    keep, window = config.ids_per_entity, config.id_window
    ids = min(ids, keep)
    empty: dict[str, dict[bytes, bytes]] = {"entities": {}, "lamports": {}, "causal": {}}
    for i, (key, value, headers) in enumerate(events.records(events.events(count, count, at=at, mode=mode,
                                                                           prefix=prefix), seq=False)):
        result = guard.process(RecordIn(key, value, headers, "in", 0, i, at), route, empty, now=at)
        state = result.writes.get((ENTITIES, key))
        if state is not None and ids > 1:
            entity = EntityState.from_bytes(state)
            entries = b""
            for version in range(1, ids + 1):
                entries = new_entries(entries, f"{key.decode()}-{version}", entity.content_hash, at, version,
                                      now=at, window=window, keep=keep, old_version=version - 1,
                                      new_version=version)
            state = replace(entity, version=ids, vclock=VectorClock({events.SOURCE: ids}),
                            entries=entries).to_bytes()
        if state is not None:
            yield key, state, []


async def memory(ctx: Context, variant: Variant, run_id: str, input_topic: str, *, restored: int, processed: int,
                 mode: str, timeout: float, settle: float = 10.0, ids: int = 1) -> dict[str, Any]:
    """RSS of the worker with `restored` + `processed` distinct entities in its state: the first loaded from
    the state changelog at start (as a restarted worker loads them; each record with `ids` recent ids), the
    others by verifying one event each."""
    lnch = ctx.launch(variant, run_id, input_topic)
    await lnch.create_topics(ctx.bootstrap, ctx.partitions)
    state_changelog = next(t for t in lnch.changelogs if t.endswith("state_by_entity-changelog"))
    loaded_at = time.monotonic()
    sizes = [0, 0]  # records, bytes of the restored state records

    def counted(records: Any) -> Any:
        for record in records:
            sizes[0] += 1
            sizes[1] += len(record[1])
            yield record

    if restored:
        # Keyed like the inputs, so each entity's state lands in the partition its events would.
        await produce(ctx.bootstrap, state_changelog, counted(entity_states(restored, at=time.time(), mode=mode,
                                                                            prefix="mem", ids=ids)))
    load_seconds = time.monotonic() - loaded_at
    worker = lnch.worker.start()
    started = time.monotonic()
    rss_restored = None
    restore_seconds = None
    error = None
    rss_at_done = None
    rss_settled = None
    try:
        async with Progress(ctx.bootstrap) as progress:
            while True:
                worker.check()
                rss = worker.sample()
                if rss_restored is None and sum((await progress.end_offsets(lnch.outputs)).values()) > 0:
                    # Outputs start only after table recovery: state is loaded.
                    rss_restored, restore_seconds = rss, time.monotonic() - started
                if await progress.committed(lnch.group, input_topic) >= processed:
                    rss_at_done = worker.sample()
                    break
                if time.monotonic() - started > timeout:
                    error = f"timed out after {timeout:.0f} s"
                    break
                await asyncio.sleep(1.0)
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and worker.alive():
            worker.sample()
            await asyncio.sleep(1.0)
        rss_settled = worker.sample()
    except Exception as exc:
        error = str(exc)
    finally:
        worker.stop()
    state_dir = worker.cwd / "state"
    disk = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file()) if state_dir.exists() else 0
    result = {
        "variant": variant.key, "run_id": run_id, "command": lnch.command, "entities": restored + processed,
        "restored_entities": restored, "processed_entities": processed,
        # The restored records: their recent ids, their mean size; and the size of an entity's record with one id
        # and with a full history (the steady state's), whatever this run restored.
        "restored_ids_per_entity": ids,
        "restored_record_mean_bytes": round(sizes[1] / sizes[0], 1) if sizes[0] else None,
        "state_record_bytes_by_ids": state_record_sizes(mode),
        "changelog_load_s": round(load_seconds, 1),
        "restore_to_first_output_s": round(restore_seconds, 1) if restore_seconds else None,
        "rss_after_restore_mb": _mb(rss_restored), "rss_all_entities_mb": _mb(rss_at_done),
        "rss_settled_mb": _mb(rss_settled), "peak_rss_mb": _mb(worker.peak_rss),
        "state_on_disk_mb": _mb(disk), "elapsed_s": round(time.monotonic() - started, 1), "error": error,
        "rss_timeline": [(round(t, 1), round(r / 2**20, 1))
                         for t, r in worker.samples[:: max(1, len(worker.samples) // 60)]],
    }
    _cleanup(worker)
    return result


def state_record_sizes(mode: str, counts: tuple[int, ...] = (1, 32)) -> dict[int, int]:
    """The size in bytes of one entity's state record after each of `counts` verified events (1 and 32: one
    recent id and a full history at the default ids_per_entity), as the guard writes it."""
    from byzguard.config import load
    from byzguard.guard import ENTITIES, Guard, RecordIn

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        config = load(events.write_config(Path(tmp) / "bench.yaml", repo=Path(__file__).resolve().parent.parent,
                                          input_topic="in", verified="v", quarantine="q", partitions=1, rules=False),
                      environ=events.secret_env())
    guard, route = Guard(config), config.routes[0]
    state: dict[str, dict[bytes, bytes]] = {"entities": {}, "lamports": {}, "causal": {}}
    at = time.time()
    sizes = {}
    for i, (key, value, headers) in enumerate(events.records(events.events(max(counts), 1, at=at, mode=mode,
                                                                           prefix="size"), seq=False)):
        for (table, name), written in guard.process(RecordIn(key, value, headers, "in", 0, i, at), route, state,
                                                    now=at).writes.items():
            if written is not None:
                state[table][name] = written
        if i + 1 in counts:
            sizes[i + 1] = len(state[ENTITIES][key])
    return sizes


def _mb(value: int | None) -> float | None:
    return round(value / 2**20, 1) if value else None


async def profile(ctx: Context, variant: Variant, run_id: str, input_topic: str, *, seconds: float,
                  out_dir: Path) -> dict[str, Any]:
    """py-spy samples of a worker busy with the pre-produced input (idle time included)."""
    pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if pyspy is None:
        return {"variant": variant.key, "error": "py-spy is not installed (pip install py-spy)"}
    lnch = ctx.launch(variant, run_id, input_topic)
    await lnch.create_topics(ctx.bootstrap, ctx.partitions)
    worker = lnch.worker.start()
    raw = out_dir / f"profile-{variant.key}.folded"
    error = None
    try:
        async with Progress(ctx.bootstrap) as progress:
            deadline = time.monotonic() + 180
            while sum((await progress.end_offsets(lnch.outputs)).values()) < 500:
                worker.check()
                if time.monotonic() > deadline:
                    raise TimeoutError("the worker produced no output in 180 s")
                await asyncio.sleep(0.25)
        cpu0 = worker.cpu()
        proc = await asyncio.create_subprocess_exec(
            pyspy, "record", "--pid", str(worker.pid), "--duration", str(int(seconds)), "--rate", "200",
            "--format", "raw", "--idle", "--threads", "--nonblocking", "--output", str(raw),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = await proc.communicate()
        except BaseException:  # cancelled (Ctrl-C): py-spy would go on sampling a worker that is being stopped
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        cpu1 = worker.cpu()
        if proc.returncode != 0:
            error = f"py-spy failed: {err.decode(errors='replace')[-500:]}"
    except Exception as exc:
        error = str(exc)
        cpu0 = cpu1 = None
    finally:
        worker.stop()
        _cleanup(worker)
    return {"variant": variant.key, "run_id": run_id, "command": lnch.command, "folded": str(raw),
            "seconds": seconds, "worker_cpu_share": round((cpu1 - cpu0) / seconds, 2) if cpu0 and cpu1 else None,
            "error": error}


async def _learn_pace(progress: Progress, worker: Worker, outputs: list[str]) -> float:
    """Committed outputs per second of a worker over 5 s, once its first output is there (at least 1)."""
    await _wait_outputs(progress, worker, outputs, 1, 180)
    t0, out0 = time.monotonic(), await _committed_outputs(progress, outputs)
    await asyncio.sleep(5)
    return max(1.0, (await _committed_outputs(progress, outputs) - out0) / (time.monotonic() - t0))


async def _committed_outputs(progress: Progress, topics: list[str]) -> int:
    """Sum of the last stable offsets of `topics` (what read_committed readers can see, markers included)."""
    return sum((await progress.end_offsets(topics, committed=True)).values())


async def crash(ctx: Context, variant: Variant, run_id: str, input_topic: str, expected: int, *, kills: int,
                wipe_every: int, seed: int, timeout: float) -> dict[str, Any]:
    """SIGKILL the worker `kills` times while it works through the input, restarting it at once (every
    `wipe_every`-th restart on an empty data dir); then account for every input event in the outputs."""
    rng = random.Random(seed)
    lnch = ctx.launch(variant, run_id, input_topic)
    await lnch.create_topics(ctx.bootstrap, ctx.partitions)
    worker = lnch.worker.start()
    state_dir = worker.cwd / "state"
    started = time.monotonic()
    recoveries: list[dict[str, Any]] = []
    error = None
    try:
        async with Progress(ctx.bootstrap) as progress:
            # Learn the pace first: kills are spread over the expected processing time.
            pace = await _learn_pace(progress, worker, lnch.outputs)
            gap = expected / pace / (kills + 1)
            for kill in range(1, kills + 1):
                await asyncio.sleep(rng.uniform(0.5, 1.5) * gap)
                worker.check()
                before = await _committed_outputs(progress, lnch.outputs)
                if await progress.committed(lnch.group, input_topic) >= expected:
                    error = f"the input was done before kill {kill}: make the run longer"
                    break
                killed_at = time.monotonic()
                worker.kill()
                wiped = kill % wipe_every == 0
                if wiped:
                    shutil.rmtree(state_dir, ignore_errors=True)
                worker = Worker(worker.name, worker.argv, worker.env, worker.cwd, worker.log_path).start()
                # Recovered = a committed output past what was visible at the kill.
                await _wait_outputs(progress, worker, lnch.outputs, before + 1, 300, committed=True)
                recoveries.append({"kill": kill, "wiped_state": wiped,
                                   "recovery_s": round(time.monotonic() - killed_at, 2),
                                   "committed_outputs_at_kill": before})
            deadline = time.monotonic() + timeout
            while await progress.committed(lnch.group, input_topic) < expected:
                worker.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not done {timeout:.0f} s after the last kill")
                await asyncio.sleep(1.0)
            await asyncio.sleep(2.0)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        worker.stop()
    elapsed = time.monotonic() - started
    accounting = await account(ctx, lnch, expected)
    _cleanup(worker)
    same_dir = [r["recovery_s"] for r in recoveries if not r["wiped_state"]]
    return {
        "variant": variant.key, "run_id": run_id, "command": lnch.command, "input_events": expected,
        "kills": len(recoveries), "wipe_every": wipe_every, "seed": seed, "elapsed_s": round(elapsed, 1),
        **accounting,
        "recoveries": recoveries,
        "recovery_s": {"median": round(statistics.median([r["recovery_s"] for r in recoveries]), 2),
                       "max": max(r["recovery_s"] for r in recoveries)} if recoveries else None,
        # SIGKILL to the next routed record on the same data dir (the wiped restarts restore from the changelogs).
        "recovery_same_dir_s": {"median": round(statistics.median(same_dir), 2), "max": max(same_dir),
                                "n": len(same_dir)} if same_dir else None,
        "error": error,
    }


async def account(ctx: Context, lnch: Launch, expected: int) -> dict[str, Any]:
    """Every input event (by its sequence number) in the committed outputs of `lnch`: lost, duplicated (in the
    verified and quarantine topics together) and quarantined (every input event is clean, so each is wrong)."""

    def seq_and_reasons(m: Any) -> tuple[int | None, bytes | None]:
        h = dict(m.headers)
        seq = h.get(events.SEQ_HEADER)
        return (int(seq) if seq is not None else None, h.get("byzguard_reasons"))

    outputs = await scan(ctx.bootstrap, lnch.outputs, read_committed=True, keep=seq_and_reasons)
    verified, quarantine = (outputs[t] for t in lnch.outputs)
    seen = Counter(s for s, _ in verified.records if s is not None)
    quarantined = Counter(s for s, _ in quarantine.records if s is not None)
    codes: Counter[str] = Counter()
    for _, reasons in quarantine.records:
        for reason in orjson.loads(reasons or b"[]"):
            codes[reason.get("code", "?")] += 1
    everywhere = seen + quarantined
    lost = [s for s in range(expected) if s not in everywhere]
    duplicated = {s: n for s, n in everywhere.items() if n > 1}
    return {
        "verified_records": verified.count, "quarantine_records": quarantine.count,
        "lost": len(lost), "lost_examples": lost[:10], "duplicated": len(duplicated),
        "duplicate_records": sum(n - 1 for n in duplicated.values()),
        "wrongly_quarantined": sum(quarantined.values()), "quarantine_codes": dict(codes),
    }


async def _wait_outputs(progress: Progress, worker: Worker, topics: list[str], at_least: int, timeout: float, *,
                        committed: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while sum((await progress.end_offsets(topics, committed=committed)).values()) < at_least:
        worker.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no output from {worker.name} within {timeout:.0f} s")
        await asyncio.sleep(0.1)


async def detection(ctx: Context, run_id: str, *, events_count: int, rate: float, eps: float, seed: int,
                    timeout: float, audit_window: float = 15.0) -> dict[str, Any]:
    """`byzguard demo` at scale: the fault injector's labeled traffic through a worker it starts (the shipped
    byzguard.yaml as a user runs it, but with `audit_window` s audit windows), scored per fault class from its
    JSON report."""
    import secrets as _secrets

    import yaml

    run_dir = ctx.workdir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    report_path = run_dir / "detection.json"
    # The shipped byzguard.yaml, with the audits' windows shortened so the run can wait for them: partial
    # writes (only the cross-stream audit can see them) are then scored like every other class.
    shipped = yaml.safe_load((ctx.repo / "byzguard.yaml").read_text()) or {}
    for audit in shipped.get("audits") or []:
        audit["within"] = f"{audit_window:g}s"
    config = run_dir / "byzguard.yaml"
    config.write_text(yaml.safe_dump(shipped, sort_keys=False))
    keys = shipped.get("keys") or {}
    env = {spec["secret_env"]: _secrets.token_hex(24) for spec in keys.values()
           if isinstance(spec, dict) and spec.get("secret_env")}
    env.update({"BYZGUARD_BROKER": ctx.bootstrap, "BYZGUARD_APP_ID": run_id, "BYZGUARD_CONFIG": str(config),
                "BYZGUARD_DATA_DIR": str(run_dir / "state"), "BYZGUARD_WEB_PORT": str(free_port()),
                "BYZGUARD_DEMO": "0"})
    args = ["-m", "app.cli", "demo", "--events", str(events_count), "--rate", str(rate), "--eps", str(eps),
            "--seed", str(seed), "--worker", "start", "--no-live", "--report", str(report_path)]
    worker = Worker.python(run_id, args, env=env, cwd=run_dir, log_path=run_dir / "demo.log")
    command = " ".join(f"{k}={v}" for k, v in env.items() if not k.startswith("BYZGUARD_KEY")) + \
        " byzguard demo " + " ".join(args[3:])
    started = time.monotonic()
    worker.start()
    error = None
    try:
        while worker.alive():
            if time.monotonic() - started > timeout:
                error = f"the demo did not finish in {timeout:.0f} s"
                break
            await asyncio.sleep(1.0)
    finally:  # a timeout, or the run cancelled (Ctrl-C): the demo stops, and with it the worker it started
        worker.stop()
    exit_code = worker.proc.returncode if worker.proc is not None else None
    try:
        report = orjson.loads(report_path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        report = None
        error = error or f"no report ({exc}); exit code {exit_code}; log {worker.log_path}:\n{worker.tail()}"
    return {"run_id": run_id, "runtime": "batched", "command": command,
            "config": f"byzguard.yaml with every audit's within set to {audit_window:g}s", "events": events_count,
            "rate_per_class": rate, "eps": eps, "seed": seed,
            "elapsed_s": round(time.monotonic() - started, 1), "exit_code": exit_code,
            "report": report, "log": str(worker.log_path), "error": error}
