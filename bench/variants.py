"""The variants the benchmark compares, and how each one is launched as a worker process."""

from __future__ import annotations

import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

from bench import events
from bench.kafka import LOG_APPEND_TIME, create_topics
from bench.procs import Worker


@dataclass(frozen=True)
class Variant:
    """One way of moving the input to an output topic."""

    key: str
    label: str
    kind: str          # raw | faust | byzguard | batch (a bench prototype with byzguard's core)
    guarantee: str     # at_least_once | exactly_once
    rules: bool = True
    args: tuple[str, ...] = ()
    #: BYZGUARD_* settings of this variant's worker (over --setting).
    settings: tuple[tuple[str, str], ...] = ()
    #: a module and its arguments that start the byzguard worker (`python -m MODULE ARGS... app.cli run`), for
    #: diagnostics that change the worker's process (bench/gctrace.py); (): `byzguard run`
    wrapper: tuple[str, ...] = ()
    #: raw and batch kinds: the worker's module (default bench.passthrough_raw / bench.batch_guard)
    module: str = ""

    def __post_init__(self) -> None:
        if self.wrapper and self.kind != "byzguard":
            raise ValueError(f"variant {self.key}: a wrapper is only applied to byzguard workers")

    @property
    def read_committed(self) -> bool:
        return self.guarantee == "exactly_once"


VARIANTS: dict[str, Variant] = {v.key: v for v in (
    Variant("a", "raw aiokafka consume-produce pass-through", "raw", "at_least_once"),
    # The physical ceiling of a Python Kafka client here (librdkafka; a bench-only dependency, the `bench` extra).
    Variant("a_ck", "raw confluent-kafka consume-produce pass-through", "raw", "at_least_once",
            module="bench.passthrough_ck"),
    # Diagnostic: a_ck with librdkafka's own producer batching (linger 5 ms, batch 1 MB) instead of a's (linger 0).
    Variant("a_ck_lib", "raw confluent-kafka pass-through, librdkafka's own producer batching", "raw",
            "at_least_once", module="bench.passthrough_ck", args=("--librdkafka-batching",)),
    # Diagnostic: a_ck with one produce request in flight per broker, as a's aiokafka sender (the latency floor of
    # librdkafka at a paced load: many small requests in flight cost the shared broker CPU, bench/results/clat-*).
    Variant("a_ck1", "raw confluent-kafka pass-through, one produce request in flight", "raw", "at_least_once",
            module="bench.passthrough_ck", args=("--in-flight", "1")),
    Variant("b", "faust pass-through agent", "faust", "at_least_once"),
    # The product: byzguard on the batched runtime (app/runtime; its inputs are committed by the group
    # <app_id>-verify).
    Variant("c", "byzguard, every check + CEL rules, RocksDB, at_least_once", "byzguard", "at_least_once"),
    Variant("d", "byzguard, every check + CEL rules, RocksDB, exactly_once", "byzguard", "exactly_once"),
    # Diagnostic: the same worker without the CEL rules, to separate the rules' cost from everything else.
    Variant("c_norules", "byzguard, every check but no CEL rules, RocksDB, at_least_once", "byzguard",
            "at_least_once", rules=False),
    Variant("b_eos", "faust pass-through agent, exactly_once", "faust", "exactly_once"),
    Variant("c_wait100", "byzguard as c, fetch max wait 100 ms", "byzguard", "at_least_once",
            settings=(("BYZGUARD_FETCH_MAX_WAIT_MS", "100"),)),
    Variant("b_wait1500", "faust pass-through agent with faust's own fetch (max wait 1500 ms)", "faust",
            "at_least_once", settings=(("BYZGUARD_FETCH_MAX_WAIT_MS", "1500"), ("BYZGUARD_FETCH_MIN_BYTES", "1"))),
    # Diagnostic: fetches that wait for more bytes (fewer, larger fetches at a paced load).
    Variant("c_min10", "byzguard as c, fetches wait up to 10 ms for 64 KiB", "byzguard", "at_least_once",
            settings=(("BYZGUARD_FETCH_MIN_BYTES", "65536"),)),
    Variant("c_min25", "byzguard as c, fetches wait up to 25 ms for 64 KiB", "byzguard", "at_least_once",
            settings=(("BYZGUARD_FETCH_MIN_BYTES", "65536"), ("BYZGUARD_FETCH_MAX_WAIT_MS", "25"))),
    # Diagnostic: c with every long (>= 5 ms) or oldest-generation garbage collection in its log (bench/gctrace.py).
    Variant("c_gctrace", "byzguard as c, garbage collections logged", "byzguard", "at_least_once",
            wrapper=("bench.gctrace",)),
    # Diagnostics: glibc's sliding mmap threshold, as before app/memory.py fixed it at 128 KiB.
    Variant("c_sliding", "byzguard as c, with glibc's sliding mmap threshold", "byzguard", "at_least_once",
            settings=(("BYZGUARD_MALLOC_MMAP_THRESHOLD_KB", "0"),)),
    # Diagnostic: the pass-through forwarding each batch of up to 1000 events (stream.take_events) back to back.
    # A prototype, not the product: byzguard's core (Guard.process, same config and RocksDB layout) in a batched
    # aiokafka loop without faust (bench/batch_guard.py), to show what the framework costs.
    Variant("e", "prototype: byzguard core in a batched aiokafka loop, RocksDB, at_least_once", "batch",
            "at_least_once"),
    Variant("e_eos", "prototype: as e, exactly_once (a transaction per partition per batch <= 100 ms)", "batch",
            "exactly_once", args=("--eos",)),
    # Diagnostic: e with its offset commit off the loop's path (a task, at most one in flight): its latency.
    Variant("e_behind", "prototype: as e, offsets committed in a task behind the loop", "batch", "at_least_once",
            args=("--commit-behind",)),
    # Shape (2) of docs/runtime-choice.md: a faust agent fed one event per fetch (bench/faust_batches.py).
    Variant("f", "prototype: faust agent fed one event per fetch, byzguard core as e, at_least_once", "batch",
            "at_least_once", module="bench.faust_batches"),
    Variant("b_take", "faust pass-through agent, batches of 1000 (take_events)", "faust", "at_least_once",
            args=("--take", "1000")),
    # Diagnostic: b written as an async generator that yields per event (b and byzguard are plain coroutines).
    Variant("b_yield", "faust pass-through agent as an async generator", "faust", "at_least_once",
            args=("--yield-each",)),
)}


@dataclass
class Launch:
    """A variant ready to run: its worker, group, output topics and the exact command."""

    variant: Variant
    worker: Worker
    group: str
    outputs: list[str]
    command: str
    config_path: Path | None = None
    changelogs: list[str] = field(default_factory=list)

    async def create_topics(self, bootstrap: str, partitions: int) -> None:
        """Create the outputs (broker timestamps) and the changelogs (compacted) before the worker starts.

        Changelogs are created here because faust creating them at start races its own metadata: the first
        table write then finds 0 partitions and the agent crashes (PartitionsMismatch), as seen on this machine
        in about half of the runs. app/provision.py already does this for audit tables; see the bench report.
        """
        await create_topics(bootstrap, self.outputs, partitions, LOG_APPEND_TIME)
        if self.changelogs:
            await create_topics(bootstrap, self.changelogs, partitions, {"cleanup.policy": "compact"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(variant: Variant, *, run_id: str, bootstrap: str, input_topic: str, partitions: int, workdir: Path,
           repo: Path, causal_buffer: bool = False, log_level: str = "info",
           extra_env: dict[str, str] | None = None) -> Launch:
    """Prepare (not start) the worker of `variant` reading `input_topic` with a fresh group and fresh outputs."""
    run_dir = workdir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "worker.log"
    if variant.kind == "raw":
        output = f"{run_id}-out"
        args = ["-m", variant.module or "bench.passthrough_raw", "--broker", bootstrap, "--input", input_topic,
                "--output", output, "--group", run_id, *variant.args]
        worker = Worker.python(run_id, args, env=dict(extra_env or {}), cwd=run_dir, log_path=log_path)
        return Launch(variant, worker, run_id, [output], "python " + shlex.join(args))
    env = {
        "BYZGUARD_BROKER": bootstrap,
        "BYZGUARD_APP_ID": run_id,
        "BYZGUARD_DATA_DIR": str(run_dir / "state"),
        "BYZGUARD_WEB_PORT": str(free_port()),
        "BYZGUARD_PROCESSING_GUARANTEE": variant.guarantee,
        "BYZGUARD_LOG_LEVEL": log_level,
        **(extra_env or {}),
        **dict(variant.settings),
    }
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    if variant.kind == "faust":
        output = f"{run_id}-out"
        args = ["-m", "bench.passthrough_faust", "--input", input_topic, "--output", output, *variant.args]
        worker = Worker.python(run_id, args, env=env, cwd=run_dir, log_path=log_path)
        return Launch(variant, worker, run_id, [output], f"{shown} python {shlex.join(args)}")
    verified, quarantine = f"{run_id}-verified", f"{run_id}-quarantine"
    config = events.write_config(run_dir / "bench.yaml", repo=repo, input_topic=input_topic, verified=verified,
                                 quarantine=quarantine, partitions=partitions, rules=variant.rules,
                                 causal_buffer=causal_buffer)
    env["BYZGUARD_CONFIG"] = str(config)
    env.update(events.secret_env())
    if variant.kind == "batch" and variant.module == "bench.faust_batches":
        args = ["-m", variant.module, "--data-dir", str(run_dir / "state"), "--config", str(config), *variant.args]
        program = "python " + shlex.join(args)
    elif variant.kind == "batch":
        args = ["-m", variant.module or "bench.batch_guard", "--broker", bootstrap, "--app-id", run_id,
                "--data-dir", str(run_dir / "state"), "--config", str(config), *variant.args]
        program = "python " + shlex.join(args)
    else:
        args = ["-m", "app.cli", "run"]  # = the `byzguard run` console script, with this checkout first on sys.path
        program = "byzguard run"
        if variant.wrapper:
            args = ["-m", *variant.wrapper, "app.cli", "run"]
            program = "python " + shlex.join(args)
    worker = Worker.python(run_id, args, env=env, cwd=run_dir, log_path=log_path)
    shown = " ".join(f"{k}={v}" for k, v in env.items() if k != events.SECRET_ENV)
    group = input_group(run_id)
    return Launch(variant, worker, group, [verified, quarantine], f"{shown} {program}", config,
                  changelogs=changelog_topics(config, run_id))


def input_group(app_id: str) -> str:
    """The consumer group that commits a byzguard worker's inputs: the batched runtime's own (app/runtime
    `verify_group`)."""
    from app.runtime.loop import verify_group

    return verify_group(app_id)


def changelog_topics(config: Path, app_id: str) -> list[str]:
    """The changelog topics the worker's tables will use (`<app_id>-<table>-changelog`)."""
    from byzguard.config import load

    try:
        from tables import table_names
    except ImportError:  # an older tables module: the two tables every route has
        def table_names(route: object) -> list[str]:
            name = getattr(route, "name", events.ROUTE)
            return [f"{name}-state_by_entity", f"{name}-lamport_by_source"]
    guard_config = load(config, environ=events.secret_env())
    return [f"{app_id}-{table}-changelog" for route in guard_config.routes for table in table_names(route)]
