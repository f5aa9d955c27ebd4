"""`make bench`: throughput, latency, memory, crash accounting, detection quality and a profile, on a real broker.

    python -m bench.run              # full size: 200,000 events over 100,000 entities, 3 interleaved repetitions
    python -m bench.run --quick      # smoke run in a few minutes
    python -m bench.run --help       # every size and phase

Variants, all reading the same pre-produced input (one topic, a fresh consumer group / app id each):
  a     raw aiokafka consume-then-produce pass-through (the stack's ceiling)
  a_ck  raw confluent-kafka pass-through (the ceiling of a Python client; the `bench` extra)
  b     faust pass-through agent (the framework's ceiling; byzguard's faust_options)
  c     byzguard (`byzguard run`) on the batched runtime, every check and the shipped CEL rules, RocksDB state,
        at_least_once
  d     the same with exactly_once
  e     a prototype, not the product: byzguard's core in a batched aiokafka loop without faust (bench code)
Also: memory (RSS with 1M entities in state), crash accounting (d SIGKILLed --crash-kills times; and two d
workers, one joining and one leaving mid-stream, bench/pair.py), detection
quality (`byzguard demo` at scale, scored per fault class), a py-spy profile; --skip leaves phases out.
Each run's topics (its input, outputs, changelogs) are deleted once its results are taken (--keep-topics keeps them).
Results: bench/results/bench.json, bench.md and profile-samples.md (bench/results/tmp/quick/ for --quick);
bench/results/profile.md is the written analysis of a full run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import events, procs, profile_report, report
from bench.kafka import create_topics, delete_topics, produce
from bench.latency_clients import CLIENTS
from bench.pair import pair as two_workers
from bench.procs import REPO, loadavg
from bench.scenarios import Context, crash, detection, latency, memory, profile, throughput
from bench.variants import VARIANTS

FULL = {"events": 200_000, "entities": 100_000, "reps": 3, "latency_seconds": 60.0, "latency_settle": 5.0,
        "memory_entities": 1_000_000,
        "profile_seconds": 30.0, "detection_events": 100_000, "memory_processed": 100_000, "crash_kills": 10}
QUICK = {"events": 5_000, "entities": 2_500, "reps": 1, "latency_seconds": 8.0, "latency_settle": 1.0,
         "memory_entities": 20_000,
         "profile_seconds": 8.0, "detection_events": 3_000, "memory_processed": 4_000, "crash_kills": 2}


def worker_settings(pairs: list[str]) -> dict[str, str]:
    """`--setting name=value` -> {"BYZGUARD_NAME": value}; refuses a pair without `=`."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--setting {pair!r}: expected NAME=VALUE, e.g. fetch_min_bytes=16384")
        env["BYZGUARD_" + name.strip().upper()] = value
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition (a few minutes)")
    parser.add_argument("--events", type=int, help="input events (full: 200000)")
    parser.add_argument("--entities", type=int, help="distinct entities of the input (full: 100000)")
    parser.add_argument("--history", type=int, default=0, metavar="N",
                        help="steady-state input for the throughput phase: every entity first gets N events (>= 40 "
                        "fills its recent-id history of 32) that are processed but not timed; --events more are "
                        "timed (default 0: the plain input, about --events/--entities events per entity)")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--reps", type=int, help="repetitions of each variant, interleaved (full: 3)")
    parser.add_argument("--variants", default="a,a_ck,b,c,d", help="comma list of " + ",".join(VARIANTS))
    parser.add_argument("--mode", choices=("structured", "binary"), default="structured",
                        help="CloudEvents content mode of the input (default structured)")
    parser.add_argument("--latency-seconds", type=float, help="paced load per latency run (full: 60)")
    parser.add_argument("--latency-settle", type=float,
                        help="seconds of paced load before the measured ones, left out of the percentiles (full: 5)")
    parser.add_argument("--latency-rate", type=float,
                        help="events/s of the paced load (default: 50%% of each variant's own median throughput)")
    parser.add_argument("--latency-rates-from", type=Path, metavar="BENCH_JSON",
                        help="take each variant's throughput (for half of it) from this earlier run's bench.json")
    parser.add_argument("--latency-reader-wait-ms", type=int, default=100,
                        help="the latency reader's fetch_max_wait_ms (default 100)")
    parser.add_argument("--latency-client", choices=CLIENTS, default="aiokafka",
                        help="the latency phase's paced producer and reader: aiokafka (default) or confluent "
                        "(confluent-kafka, the bench extra: less of the bench's own CPU per event on the machine the "
                        "worker runs on; bench/latency_clients.py)")
    parser.add_argument("--latency-variants", default=None, help="variants with a latency run (default: --variants)")
    parser.add_argument("--memory-entities", type=int, help="entities for the RSS run (full: 1000000; 0 skips)")
    parser.add_argument("--memory-variant", default="c_norules",
                        help="the variant of the RSS run")
    parser.add_argument("--memory-ids", type=int, default=1, metavar="N",
                        help="recent ids in each restored entity's state record (default 1, as after one event; 32, "
                        "the most a record holds by default, is the steady state's record)")
    parser.add_argument("--memory-processed", type=int,
                        help="of those, entities loaded by verifying an event each (the rest are restored from the "
                        "state changelog; full: 100000)")
    parser.add_argument("--profile-seconds", type=float, help="py-spy sampling time (0 skips)")
    parser.add_argument("--profile-variants", default="c,d", help="variants to profile")
    parser.add_argument("--causal-buffer", action="store_true", help="turn the route's causal buffer on")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a worker setting (docs/configuration.md), e.g. fetch_min_bytes=16384, for every faust and"
                        " byzguard worker; repeatable")
    parser.add_argument("--crash-kills", type=int,
                        help="crash accounting: SIGKILLs of the exactly_once worker "
                        "during a run over the input (full: 10)")
    parser.add_argument("--pair-leave", choices=("stop", "kill", ""), default="stop",
                        help="two-worker accounting (exactly_once): the leaving worker gets SIGTERM (stop) or SIGKILL "
                        "(kill); '' skips it")
    parser.add_argument("--crash-wipe-every", type=int, default=3, help="every Nth restart starts on an empty data dir")
    parser.add_argument("--detection-events", type=int,
                        help="detection quality: events of the `byzguard demo` (fault injector) run (full: 100000)")
    parser.add_argument("--detection-rate", type=float, default=0.01, help="probability per event of each fault class")
    parser.add_argument("--detection-eps", type=float, default=5000.0,
                        help="send rate cap (the demo also keeps at most 250 records unjudged)")
    parser.add_argument("--skip", default="", help="comma list of phases to skip: "
                        "memory,crash,pair,detection,throughput,latency,profile")
    parser.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                        help="run the workers from the checkout itself instead of a copy taken at start")
    parser.add_argument("--broker", help="use this broker instead of starting a local one (results then say so)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results[/quick])")
    parser.add_argument("--keep-topics", action="store_true",
                        help="keep each run's topics on the broker for inspection (default: deleted once the run's "
                        "results are taken)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in [*args.variants, args.memory_variant] if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if VARIANTS[args.memory_variant].kind != "byzguard":
        parser.error(f"--memory-variant {args.memory_variant}: the memory phase restores byzguard's state changelog; "
                     f"pick a byzguard worker: {[k for k, v in VARIANTS.items() if v.kind == 'byzguard']}")
    args.latency_variants = [v for v in (args.latency_variants or ",".join(args.variants)).split(",") if v]
    args.profile_variants = [v for v in args.profile_variants.split(",") if v]
    args.skip = {s for s in args.skip.split(",") if s}
    if args.out is None:
        # Smoke runs go where git does not look (bench/results/tmp/ is ignored); full runs are meant to be committed.
        args.out = REPO / "bench" / "results" / ("tmp/quick" if args.quick else "")
    return args


def log(text: str) -> None:
    print(f"[bench {datetime.now().strftime('%H:%M:%S')} load {loadavg()[0]:.2f}] {text}", flush=True)


def environment(args: argparse.Namespace, kafka_version: str) -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    import os

    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    return {
        "host": platform.node(), "cpus": os.cpu_count(), "memory_mb": mem, "python": platform.python_version(),
        "kafka": kafka_version, "faust-streaming": version("faust-streaming"), "aiokafka": version("aiokafka"),
        "rocksdict": version("rocksdict"), "cel-python": version("cel-python"),
        "broker": args.broker or "local KRaft broker started by the bench (app.dev.localkafka.LocalKafka)",
        "git_head": _git_head(),
    }


def _git_head() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.strip()
        return head + (f" + {len(dirty.splitlines())} uncommitted/untracked files" if dirty else "")
    except Exception:
        return None


def snapshot(workdir: Path) -> dict[str, Any]:
    """Copy the checkout (code only) into the run's directory and make every worker import from the copy."""
    target = workdir / "src"
    ignore = shutil.ignore_patterns(".git", ".venv", ".cache", ".hypothesis", ".mypy_cache", ".ruff_cache",
                                    ".pytest_cache", "__pycache__", "results", "*.egg-info")
    shutil.copytree(REPO, target, ignore=ignore)
    procs.SOURCE[0] = target
    status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    diff = subprocess.run(["git", "diff", "HEAD"], cwd=REPO, capture_output=True).stdout
    return {"path": str(target), "git_status": status.splitlines(),
            "git_diff_sha256": hashlib.sha256(diff).hexdigest()}


async def bench(args: argparse.Namespace, bootstrap: str, broker_pid: int | None, kafka_version: str, *,
                stamp: str | None = None) -> dict[str, Any]:
    """Every phase not skipped, in turn. Each phase deletes its topics (unless --keep-topics) when it ends, however
    it ends: its results taken, an exception, a cancellation (Ctrl-C, SIGTERM); `stamp` (default: the start time)
    is in the name of every topic and of the run's directory."""
    # `kill -USR1 <pid>` prints where every task of the harness waits (a stuck run can then be understood).
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
    stamp = stamp or datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    async with AsyncExitStack() as later:  # what outlives one phase: the throughput input (the profile reads it)
        return await _phases(args, bootstrap, broker_pid, kafka_version, stamp, later)


async def _phases(args: argparse.Namespace, bootstrap: str, broker_pid: int | None, kafka_version: str, stamp: str,
                  later: AsyncExitStack) -> dict[str, Any]:
    workdir = REPO / ".cache" / "bench" / stamp
    workdir.mkdir(parents=True, exist_ok=True)
    code = snapshot(workdir) if args.snapshot else {"path": str(REPO)}
    ctx = Context(bootstrap, broker_pid, args.partitions, workdir, Path(code["path"]), causal_buffer=args.causal_buffer,
                  settings=worker_settings(args.setting))
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "environment": environment(args, kafka_version),
        "settings": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
        "workdir": str(workdir), "code": code, "loadavg_start": loadavg(),
    }
    now = time.time()
    results["input"] = _input_description(args, now)
    # Runs whose worker died of a SIGKILL the bench did not send (this machine is shared); each is run again.
    incidents: list[dict[str, Any]] = []
    results["incidents"] = incidents

    # The phases the last committed run lacks go first: a run cut short still adds them.
    if "memory" not in args.skip and args.memory_entities:
        topic = f"mem-{stamp}"
        processed = min(args.memory_processed, args.memory_entities)
        restored = args.memory_entities - processed
        key = args.memory_variant
        log(f"memory: {restored} entities through the state changelog (restore at start), {processed} by "
            f"verifying one event each ({topic})")
        async with topics_dropped(args, bootstrap, f"m-{stamp}-{key}-", topic):
            await create_topics(bootstrap, [topic], args.partitions)
            await produce(bootstrap, topic, events.records(events.events(processed, processed, at=time.time(),
                                                                         mode=args.mode, prefix="memp")))
            # Without the CEL rules by default: they do not touch state, and verifying goes faster.
            result = await memory(ctx, VARIANTS[key], f"m-{stamp}-{key}", topic, restored=restored,
                                  processed=processed, mode=args.mode, timeout=max(900.0, processed / 50),
                                  ids=args.memory_ids)
            log(f"  -> RSS {result['rss_after_restore_mb']} MB after restoring {restored}, "
                f"{result['rss_all_entities_mb']} MB with all {args.memory_entities}, settled "
                f"{result['rss_settled_mb']} MB, peak {result['peak_rss_mb']} MB"
                + (f" ERROR {result['error']}" if result["error"] else ""))
            results["memory"] = result
            _save(args, results)

    if "crash" not in args.skip and args.crash_kills:
        topic = results.get("throughput", {}).get("input_topic")
        own_input = topic is None
        if topic is None:
            topic = f"crash-{stamp}"
        async with topics_dropped(args, bootstrap, f"k-{stamp}-d-", *([topic] if own_input else [])):
            if own_input:
                await create_topics(bootstrap, [topic], args.partitions)
                await produce(bootstrap, topic, events.records(events.events(args.events, args.entities, at=now,
                                                                             mode=args.mode)))
            log(f"crash accounting: {args.crash_kills} SIGKILLs of the exactly_once worker over {args.events} events")
            result = await crash(ctx, VARIANTS["d"], f"k-{stamp}-d", topic, args.events, kills=args.crash_kills,
                                 wipe_every=args.crash_wipe_every, seed=7, timeout=max(600.0, args.events / 20))
            log(f"  -> lost {result['lost']}, duplicated {result['duplicated']}, wrongly quarantined "
                f"{result['wrongly_quarantined']}, recovery {result['recovery_s']}"
                + (f" ERROR {result['error']}" if result["error"] else ""))
            results["crash"] = result
            _save(args, results)

    if "pair" not in args.skip and args.pair_leave:
        topic = results.get("throughput", {}).get("input_topic") or f"pair-{stamp}"
        own_input = "throughput" not in results
        async with topics_dropped(args, bootstrap, f"w-{stamp}-d-", *([topic] if own_input else [])):
            if own_input:
                await create_topics(bootstrap, [topic], args.partitions)
                await produce(bootstrap, topic, events.records(events.events(args.events, args.entities, at=now,
                                                                             mode=args.mode)))
            log(f"two-worker accounting: exactly_once, B joins and A leaves ({args.pair_leave}) over {args.events} "
                "events")
            result = await two_workers(ctx, VARIANTS["d"], f"w-{stamp}-d", topic, args.events, leave=args.pair_leave,
                                       timeout=max(600.0, args.events / 20))
            log(f"  -> lost {result['lost']}, duplicated {result['duplicated']}, wrongly quarantined "
                f"{result['wrongly_quarantined']}" + (f" ERROR {result['error']}" if result["error"] else ""))
            results["pair"] = result
            _save(args, results)

    if "detection" not in args.skip and args.detection_events:
        log(f"detection: byzguard demo, {args.detection_events} events, each "
            f"fault class at {args.detection_rate:.0%}")
        # Only the worker's own topics: the demo's inputs and outputs are the shipped byzguard.yaml's fixed names.
        async with topics_dropped(args, bootstrap, f"x-{stamp}-"):
            result = await detection(ctx, f"x-{stamp}", events_count=args.detection_events, rate=args.detection_rate,
                                     eps=args.detection_eps, seed=11, timeout=max(900.0, args.detection_events / 20))
            log("  -> " + (result["error"] or f"exit {result['exit_code']} in {result['elapsed_s']} s"))
            results["detection"] = result
            _save(args, results)

    if "throughput" not in args.skip:
        topic = f"tput-{stamp}"
        history = args.history * args.entities  # steady state: the untimed events before the timed ones
        total = history + args.events
        log(f"pre-producing {total} {args.mode} events over {args.entities} entities into {topic}"
            + (f" (the first {history}, {args.history} per entity, processed but not timed)" if history else ""))
        # Its input serves the profile too: deleted when the whole run ends, however it ends.
        later.push_async_callback(drop_topics, args, bootstrap, topic)
        await create_topics(bootstrap, [topic], args.partitions)
        t0 = time.monotonic()
        await produce(bootstrap, topic, events.records(events.events(total, args.entities, at=now, mode=args.mode)))
        log(f"pre-produced in {time.monotonic() - t0:.1f} s")
        runs = []
        timeout = max(300.0, total / 50)
        for rep in range(1, args.reps + 1):
            for key in args.variants:
                run_id = f"t-{stamp}-{key}-r{rep}"
                log(f"throughput {key} rep {rep}/{args.reps}: {VARIANTS[key].label}")
                async with topics_dropped(args, bootstrap, run_id + "-"):  # also the "-again" run's
                    result = await throughput(ctx, VARIANTS[key], run_id, topic, total, timeout=timeout,
                                              timed_from=history)
                    if _killed_from_outside(result):
                        incidents.append(result)
                        log(f"  worker SIGKILLed by something outside the bench ({result['error'][:80]}...); "
                            "once more")
                        result = await throughput(ctx, VARIANTS[key], run_id + "-again", topic, total,
                                                  timeout=timeout, timed_from=history)
                    result["rep"] = rep
                    runs.append(result)
                    _save(args, results | {"throughput": {"runs": runs}})
                log(f"  -> {result['events_per_s']} events/s over {result['span_s']} s, "
                    f"{result['worker_cpu_us_per_event']} us CPU/event, host {result['host']}"
                    + (f" ERROR {result['error']}" if result["error"] else ""))
        results["throughput"] = {"input_topic": topic, "runs": runs, "summary": report.summarise_throughput(runs)}
        results["ratios"] = report.ratios(runs)

    if "latency" not in args.skip and args.latency_variants:
        # Each variant at half of its own median throughput of this run (--latency-rate: one rate for all).
        measured = json.loads(args.latency_rates_from.read_text()) if args.latency_rates_from else results
        rates = {key: args.latency_rate or report.half_of(measured, key) or report.half_of_c(measured)
                 for key in args.latency_variants}
        missing = [key for key, rate in rates.items() if rate is None]
        if missing:
            log(f"no latency runs of {missing}: no throughput to take half of (give --latency-rate)")
        rates = {key: rate for key, rate in rates.items() if rate is not None}
        if rates:
            warmup = 200
            lat_records = {}
            for key, rate in rates.items():
                paced = max(200, int(rate * (args.latency_settle + args.latency_seconds)))
                lat_records[key] = list(events.records(events.events(
                    warmup + paced, max(1, min(args.entities, warmup + paced)), at=time.time(), mode=args.mode,
                    prefix="lat")))
            runs = []
            for rep in range(1, args.reps + 1):
                for key, rate in rates.items():
                    run_id = f"l-{stamp}-{key}-r{rep}"
                    log(f"latency {key} rep {rep}/{args.reps} at {rate:.0f} events/s for {args.latency_settle:g} + "
                        f"{args.latency_seconds:.0f} s")
                    # The same run each time (once more under its own id if something outside killed it).
                    run = functools.partial(latency, ctx, VARIANTS[key], records=lat_records[key], warmup=warmup,
                                            rate=rate, settle=args.latency_settle,
                                            timeout=max(120.0, args.latency_seconds * 3),
                                            reader_wait_ms=args.latency_reader_wait_ms, client=args.latency_client)
                    async with topics_dropped(args, bootstrap, run_id + "-"):  # its input is `<run_id>-in`
                        result = await run(run_id=run_id)
                        if _killed_from_outside(result):
                            incidents.append(result)
                            log("  worker SIGKILLed by something outside the bench; once more")
                            result = await run(run_id=run_id + "-again")
                        result["rep"] = rep
                        runs.append(result)
                        _save(args, results | {"latency": {"runs": runs}})
                    log(f"  -> p50 {result['p50_ms']} p99 {result['p99_ms']} p99.9 {result['p999_ms']} ms "
                        f"({result['samples']} samples, {result['rate_achieved']}/s)"
                        + (f" ERROR {result['error']}" if result["error"] else ""))
            results["latency"] = {"rate": rates.get("c"), "rates_from": str(args.latency_rates_from or "this run"),
                                  "rates": {k: round(r, 1) for k, r in rates.items()},
                                  "warmup": warmup, "settle_s": args.latency_settle, "client": args.latency_client,
                                  "runs": runs,
                                  "summary": report.summarise_latency(runs)}

    if "profile" not in args.skip and args.profile_seconds and "throughput" in results:
        profiles = []
        for key in args.profile_variants:
            log(f"profile {key} for {args.profile_seconds:.0f} s with py-spy")
            async with topics_dropped(args, bootstrap, f"p-{stamp}-{key}-"):
                prof = await profile(ctx, VARIANTS[key], f"p-{stamp}-{key}", results["throughput"]["input_topic"],
                                     seconds=args.profile_seconds, out_dir=workdir)
                if not prof.get("error"):
                    prof["summary"] = profile_report.summarise(Path(prof["folded"]))
                profiles.append(prof)
            log("  -> " + (prof.get("error") or f"{prof['summary']['samples']} samples"))
        results["profile"] = profiles

    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["loadavg_end"] = loadavg()
    return results


@asynccontextmanager
async def topics_dropped(args: argparse.Namespace, bootstrap: str, *prefixes: str) -> AsyncIterator[None]:
    """Around a phase (or one run of it): its topics (every name starting with one of `prefixes`) are deleted when
    the block ends, however it ends (`drop_topics`): a phase that raises, times out or is cancelled (Ctrl-C)
    leaves none behind either."""
    try:
        yield
    finally:
        await drop_topics(args, bootstrap, *prefixes)


async def drop_topics(args: argparse.Namespace, bootstrap: str, *prefixes: str) -> None:
    """Delete the topics of a finished run (every name starting with one of `prefixes`) unless --keep-topics:
    left behind, a benchmark's topics pile up on the broker (slow broker start, huge whole-cluster metadata).
    Best effort: a failure only warns."""
    if args.keep_topics or not prefixes:
        return
    try:
        names = await asyncio.wait_for(delete_topics(bootstrap, prefixes), 60)
    except Exception as exc:
        log(f"WARNING: could not delete the topics {list(prefixes)}*: {exc!r}")
    else:
        log(f"deleted {len(names)} topics ({', '.join(p + '*' for p in prefixes)})")


async def _cancelled_by_sigterm(work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Await `work`, which SIGTERM cancels as Ctrl-C does: its phases' cleanup runs (workers stopped, topics
    deleted). Without this a SIGTERM ends the harness at once, and the workers, each in a process group of its
    own, go on running."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await work
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


def _killed_from_outside(result: dict[str, Any]) -> bool:
    return "exited with code -9" in (result.get("error") or "")


def _input_description(args: argparse.Namespace, now: float) -> dict[str, Any]:
    sample = list(events.records(events.events(min(1000, args.events), min(1000, args.entities), at=now,
                                               mode=args.mode)))
    return {
        "events": args.events, "entities": args.entities, "partitions": args.partitions, "mode": args.mode,
        "history_per_entity": args.history, "untimed_history_events": args.history * args.entities,
        "mean_value_bytes": round(sum(len(v) for _, v, _ in sample) / len(sample), 1),
        "mean_header_bytes": round(sum(sum(len(k) + len(v) for k, v in h) for _, _, h in sample) / len(sample), 1),
        "integrity": "hmac-sha256 (key bench-1)", "checks": "integrity, authorization, idempotency, version, "
        "causal (lamport + vector clock), time, invariant (the shipped CEL rules of price.updated)",
        "example_value": sample[0][1].decode(),
    }


def _save(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Write what we have so far (a long run that dies still leaves its figures)."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log(f"{'quick' if args.quick else 'full'} run: {args.events} events, {args.entities} entities, "
        f"{args.partitions} partitions, {args.reps} reps, variants {args.variants}; results in {args.out}")
    with ExitStack() as stack:
        if args.broker:
            bootstrap, broker_pid, kafka_version = args.broker, None, "external"
        else:
            from app.dev.localkafka import LocalKafka

            data_dir = REPO / ".cache" / "bench" / "kafka" / "data"
            kafka = stack.enter_context(LocalKafka(data_dir=data_dir, fresh=True))
            bootstrap, broker_pid, kafka_version = kafka.bootstrap_servers, kafka.pid, kafka.version
            log(f"local Kafka {kafka_version} broker at {bootstrap} (pid {broker_pid})")
        try:
            results = asyncio.run(_cancelled_by_sigterm(bench(args, bootstrap, broker_pid, kafka_version)))
        except (KeyboardInterrupt, asyncio.CancelledError):
            # Every phase stopped its workers and deleted its topics on the way out; the figures taken so far
            # are in bench.json; the bench's own broker stops as this block ends.
            log(f"interrupted; what was measured so far is in {args.out / 'bench.json'}")
            return 130
    _save(args, results)
    (args.out / "bench.md").write_text(report.markdown(results))
    if results.get("profile"):
        (args.out / "profile-samples.md").write_text(
            "".join(profile_report.markdown(f"{p['variant']}: {report.label(p['variant'])}", p["summary"])
                    + "\n" for p in results["profile"] if p.get("summary")))
    log(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")
    print((args.out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
