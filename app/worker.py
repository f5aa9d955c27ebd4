"""The composition root: settings + configuration -> a faust App (web server, timers) with the batched runtime
(app/runtime), which runs every route's verify stream and the audits."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import internals, logs, metrics
from app.backlog import INTERVAL as BACKLOG_INTERVAL
from app.backlog import QuarantineBacklog
from app.faust_producer import scope_producer_metadata
from app.logs import QuietRepeats
from app.review.store import decisions_topic_name
from app.settings import Settings
from byzguard.config import GuardConfig
from byzguard.guard import Guard
from tables import store_options

if TYPE_CHECKING:
    from app.runtime import BatchedRuntime
    from app.runtime.owners import OwnerDirectory

log = logging.getLogger(__name__)

@dataclass
class GuardApp:
    """The faust App (web server, timers) and the batched runtime that runs the routes on it."""

    app: faust.App
    guard: Guard
    #: RocksDB options of every table (tables.store_options).
    store_options: dict[str, Any] = field(default_factory=dict)
    #: The filter that keeps a broker outage from flooding the log (app/logs.py); attach it to the log handlers.
    quiet_logs: QuietRepeats = field(default_factory=QuietRepeats)
    #: The batched runtime (app/runtime), and who owns which of its partitions (app/runtime/owners.py); both set
    #: by build_app.
    runtime: BatchedRuntime | None = None
    owners: OwnerDirectory | None = None


def faust_options(settings: Settings, bootstrap: str) -> dict[str, Any]:
    """Every faust setting byzguard uses, passed explicitly; faust reads no environment variables."""
    return {
        "broker": f"kafka://{bootstrap}",
        "store": "rocksdb://",
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
        "autodiscover": False,
        "env": {},  # faust must not read BROKER_URL & co. from the environment behind our back
    }


def attach_batched_runtime(built: GuardApp, settings: Settings, config: GuardConfig,
                           bootstrap: str) -> BatchedRuntime:
    """Start the batched runtime (app/runtime) with the App: it runs every route's verify stream."""
    from app.runtime import BatchedRuntime
    from app.runtime.owners import OwnerDirectory, assignor_for

    conf = built.app.conf
    built.owners = OwnerDirectory(str(conf.canonical_url))  # the URL the other workers forward requests to
    options: dict[str, Any] = dict(
        app_id=settings.app_id, bootstrap=bootstrap, config=config, guard=built.guard, tabledir=conf.tabledir,
        store_options=built.store_options, guarantee=settings.processing_guarantee,
        batch_max_records=settings.batch_max_records, batch_max_ms=settings.batch_max_ms,
        batch_overlap=settings.batch_overlap, commit_interval=settings.commit_interval,
        step_interval_ms=settings.step_interval_ms,
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
    # faust runs no stream of its own (its exactly_once fails on a consumer without topics): the batched
    # runtime's transactions are its own, the audits' included.
    options["processing_guarantee"] = "at_least_once"
    # faust's consumer gets the batched runtime's client id: a member a previous process on this data dir left
    # in faust's group is found and removed as well (app/runtime/membership.py).
    from app.runtime.membership import client_id

    options["broker_client_id"] = client_id(settings.data_dir, settings.worker_id)
    app = faust.App(settings.app_id, **options)
    scope_producer_metadata(app, [topic for route in config.routes for topic in route.inputs])
    guard = Guard(config)
    built = GuardApp(app=app, guard=guard, store_options=store_options(
        write_buffer_mb=settings.rocksdb_write_buffer_mb, block_cache_mb=settings.rocksdb_block_cache_mb))
    runtime = attach_batched_runtime(built, settings, config, bootstrap)
    log.info("runtime: batched (every route's verify stream runs in one loop, app/runtime)")
    metrics.configure(config)
    logs.install(app, built.quiet_logs)  # says once that the broker is gone, and when it is back
    backlog = QuarantineBacklog(bootstrap, config, decisions_topic_name(settings.app_id, settings.decisions_topic))

    @app.timer(interval=BACKLOG_INTERVAL)  # type: ignore[untyped-decorator]  # faust's App.timer is untyped
    async def measure_quarantine_backlog() -> None:
        # The input partitions this worker owns.
        await backlog.update(list(runtime.positions))

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
    from app.entities import register_entity_views  # GET /entities/... (docs/last-known-good.md)

    register_entity_views(built, config)
    return built
