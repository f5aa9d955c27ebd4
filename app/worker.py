"""The composition root: settings + configuration -> a faust App with its topics, tables and agents."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agents.verify import attach_verify_agent
from app import eos, internals, logs, metrics
from app.backlog import INTERVAL as BACKLOG_INTERVAL
from app.backlog import QuarantineBacklog
from app.fetching import tune_fetch
from app.logs import QuietRepeats
from app.outbox import Outbox
from app.review.store import decisions_topic_name
from app.settings import Settings
from byzguard.config import GuardConfig
from byzguard.errors import ConfigError
from byzguard.guard import Guard
from tables import RouteTables, declare_route_tables, store_options
from tables.buffer import StateBuffer
from topics import RouteTopics, declare_route_topics

if TYPE_CHECKING:
    from app.runtime import BatchedRuntime
    from app.runtime.owners import OwnerDirectory

log = logging.getLogger(__name__)

#: The fetch max wait of faust's consumer under the batched runtime (its streams are reviews and decisions: a
#: record on them waits at most this long; an idle consumer polls this often).
FAUST_STREAMS_MAX_WAIT_MS = 500


@dataclass
class GuardApp:
    """The faust App and what was declared on it, by route name."""

    app: faust.App
    guard: Guard
    #: The verify agents' pending state writes (tables/buffer.py); read state through it.
    buffer: StateBuffer
    topics: dict[str, RouteTopics] = field(default_factory=dict)
    tables: dict[str, RouteTables] = field(default_factory=dict)
    agents: dict[str, Any] = field(default_factory=dict)
    #: RocksDB options of every table (tables.store_options).
    store_options: dict[str, Any] = field(default_factory=dict)
    #: The filter that keeps a broker outage from flooding the log (app/logs.py); attach it to the log handlers.
    quiet_logs: QuietRepeats = field(default_factory=QuietRepeats)
    #: The batched runtime (app/runtime) once the App started it, and who owns which of its partitions
    #: (app/runtime/owners.py); both None under the faust runtime.
    runtime: BatchedRuntime | None = None
    owners: OwnerDirectory | None = None


def faust_options(settings: Settings, bootstrap: str) -> dict[str, Any]:
    """Every faust setting byzguard uses, passed explicitly; faust reads no environment variables."""
    return {
        "broker": f"kafka://{bootstrap}",
        "store": "rocksdb://" if settings.state_store == "rocksdb" else "memory://",
        "datadir": str(settings.data_dir),
        "processing_guarantee": settings.processing_guarantee,
        "web_host": settings.web_host,
        "web_bind": settings.web_host,
        "web_port": settings.web_port,
        "web_enabled": True,
        "web_in_thread": False,
        # faust's /table/<table>/<key>/ views serve raw table state to anyone; byzguard serves entity state
        # only through its own views (/entities/..., /review/api/... with a token). Its stats and graph views
        # stay off too (they follow `debug` otherwise).
        "web_tables_enabled": False,
        "web_stats_enabled": False,
        "web_graph_enabled": False,
        "topic_replication_factor": 1,
        "topic_allow_declare": True,
        "consumer_auto_offset_reset": "earliest",
        "broker_commit_interval": settings.commit_interval,
        "broker_commit_every": 10_000,
        # Heartbeats run on the consumer's own thread, so a busy event loop does not miss them.
        "broker_session_timeout": settings.session_timeout,
        "broker_heartbeat_interval": settings.session_timeout / 10,
        "table_standby_replicas": 0,
        "broker_commit_livelock_soft_timeout": settings.livelock_timeout,
        "autodiscover": False,
        "env": {},  # faust must not read BROKER_URL & co. from the environment behind our back
    }


def attach_batched_runtime(built: GuardApp, settings: Settings, config: GuardConfig,
                           bootstrap: str) -> BatchedRuntime:
    """Start the batched runtime (app/runtime) with the App: it runs every route's verify stream."""
    from app.runtime import BatchedRuntime, check_routes
    from app.runtime.owners import OwnerDirectory, assignor_for

    check_routes(config)
    if settings.state_store != "rocksdb":  # not silently ignored: the state would be on disk after all
        raise ConfigError(f"BYZGUARD_STATE_STORE={settings.state_store} is not run by the batched runtime (its "
                          "state is in RocksDB, restored from the changelogs); unset it, or run BYZGUARD_RUNTIME=faust")
    conf = built.app.conf
    built.owners = OwnerDirectory(str(conf.canonical_url))  # the URL the other workers forward requests to
    options: dict[str, Any] = dict(
        app_id=settings.app_id, bootstrap=bootstrap, config=config, guard=built.guard, tabledir=conf.tabledir,
        store_options=built.store_options, guarantee=settings.processing_guarantee,
        batch_max_records=settings.batch_max_records, batch_max_ms=settings.batch_max_ms,
        session_timeout=settings.session_timeout, fetch_min_bytes=settings.fetch_min_bytes,
        fetch_max_wait_ms=settings.fetch_max_wait_ms, assignor=assignor_for(built.owners), data_dir=settings.data_dir,
        worker_id=settings.worker_id,
        producer={"linger_ms": int(conf.producer_linger * 1000), "max_batch_size": conf.producer_max_batch_size,
                  "max_request_size": conf.producer_max_request_size,
                  "request_timeout_ms": int(conf.producer_request_timeout * 1000)})

    # Started before faust's own consumer and producer (not as an app.service, which starts after faust's group
    # join and table recovery): after a restart the routes' streams do not wait for faust's group.
    runtime = BatchedRuntime(**options)
    built.runtime = runtime  # the last-known-good view and the review page read its state
    built.app.add_dependency(runtime)
    return runtime


def build_app(settings: Settings, config: GuardConfig, bootstrap: str) -> GuardApp:
    """Declare everything the worker runs on a new faust App."""
    # On untested faust/aiokafka/mode versions the private names byzguard relies on may have changed.
    internals.check_versions(allow_untested=settings.allow_untested_versions)
    options = faust_options(settings, bootstrap)
    faust_eos = settings.processing_guarantee == "exactly_once"
    if settings.runtime == "batched":
        # faust runs no stream of its own then (its exactly_once fails on a consumer without topics): the batched
        # runtime's transactions are its own, the audits' included.
        faust_eos = False
        options["processing_guarantee"] = "at_least_once"
    if settings.runtime == "batched":
        # faust's consumer gets the batched runtime's client id: a member a previous process on this data dir left
        # in faust's group is found and removed as well (app/runtime/membership.py).
        from app.runtime.membership import client_id

        options["broker_client_id"] = client_id(settings.data_dir, settings.worker_id)
    app = faust.App(settings.app_id, **options)
    if faust_eos:
        eos.install(app, bootstrap)  # what faust's exactly_once leaves out (docs/exactly-once.md)
    else:
        eos.install_in_order(app, bootstrap)  # no record skipped or processed twice (app/eos.py, fix 7)
    if settings.runtime == "batched":
        # faust's consumer reads only the low-traffic review and decision streams then: polling them every 10 ms
        # woke its thread 100 times a second, each wake taking the GIL from the verify loop (profile of the batched
        # runtime under load). BYZGUARD_FETCH_MAX_WAIT_MS applies to the batched runtime's consumer.
        tune_fetch(app, min_bytes=1, max_wait_ms=max(settings.fetch_max_wait_ms, FAUST_STREAMS_MAX_WAIT_MS))
    else:
        tune_fetch(app, min_bytes=settings.fetch_min_bytes, max_wait_ms=settings.fetch_max_wait_ms)
    outbox = Outbox(app)
    app.task(outbox.run)  # the sender: batches go out while the agents work (app/outbox.py)
    buffer = StateBuffer(outbox)
    # State writes and every record of the agents are delivered before the offsets of their events commit.
    eos.before_commit(app, buffer.flush)
    eos.after_commit(app, buffer.committed)  # under exactly_once the stores get state only once it is committed
    guard = Guard(config)
    built = GuardApp(app=app, guard=guard, buffer=buffer, store_options=store_options(
        write_buffer_mb=settings.rocksdb_write_buffer_mb, block_cache_mb=settings.rocksdb_block_cache_mb))
    batched = settings.runtime == "batched"
    for route in config.routes:
        topics = declare_route_topics(app, route)
        built.topics[route.name] = topics
        if batched:  # the batched runtime owns the route's state: faust must not open its databases
            continue
        tables = declare_route_tables(app, route, built.store_options)
        built.tables[route.name] = tables
        built.agents[route.name] = attach_verify_agent(app, guard, route, topics, tables, buffer)
    if batched:
        attach_batched_runtime(built, settings, config, bootstrap)
    log.info("runtime: %s (the routes' verify streams run %s)", settings.runtime,
             "in the batched loop, app/runtime" if batched else "as faust agents")
    metrics.configure(config)
    logs.install(app, built.quiet_logs)  # says once that the broker is gone, and when it is back
    # A repartitioning route's verify agent reads its repartition topic: its lag is the route's too.
    input_topics = frozenset(t for route in config.routes for t in route.inputs) | frozenset(
        topics.repartition_topic.get_topic_name() for topics in built.topics.values()
        if topics.repartition_topic is not None)

    @app.timer(interval=metrics.LAG_INTERVAL)  # type: ignore[untyped-decorator]  # faust's App.timer is untyped
    async def measure_consumer_lag() -> None:
        await metrics.update_consumer_lag(app.consumer, input_topics)

    backlog = QuarantineBacklog(bootstrap, config, decisions_topic_name(settings.app_id, settings.decisions_topic))

    @app.timer(interval=BACKLOG_INTERVAL)  # type: ignore[untyped-decorator]  # faust's App.timer is untyped
    async def measure_quarantine_backlog() -> None:
        # The input partitions this worker owns: the batched runtime's, or faust's consumer's.
        runtime = built.runtime
        await backlog.update(list(runtime.positions) if runtime is not None else app.assignor.assigned_actives())

    class BacklogService(Service):
        """Stops the backlog's reader with the worker."""

        async def on_stop(self) -> None:
            await backlog.stop()

    app.service(BacklogService)

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]  # mode's Signal.connect is typed for plain functions; faust awaits async receivers
    async def freeze_long_lived_objects(sender: Any, **kwargs: Any) -> None:
        # A full collection of Python's garbage collector scans every long-lived object: some 120,000 once the
        # worker runs (faust, aiokafka, the CEL rules' parsers), 50-80 ms each time on the bench machine, several
        # times a minute: a latency spike for every event in flight. Frozen, they are left out of collections
        # (what an event allocates dies young); again after each rebalance, which builds new long-lived ones.
        gc.collect()
        gc.freeze()
        log.info("garbage collector: %d long-lived objects frozen", gc.get_freeze_count())

    @app.page("/metrics")
    async def metrics_view(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/healthz")
    async def health_view(web: Any, request: Any) -> Any:
        return web.json({"status": "ok", "routes": [r.name for r in config.routes]})

    from app.review.web import register_review  # the review page and API (/review/), docs/review.md

    register_review(built, settings, bootstrap)
    from agents.audit import attach_audits  # cross-stream audits (docs/audits.md)
    from app.entities import register_entity_views  # GET /entities/... (docs/last-known-good.md)

    if not batched:  # on the batched runtime the audits are its stages (app/runtime/audits.py)
        attach_audits(built, config)
    register_entity_views(built, config)
    return built
