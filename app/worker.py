"""The composition root: settings + configuration -> a faust App with its topics, tables and agents."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agents.verify import attach_verify_agent
from app import metrics
from app.settings import Settings
from byzguard.config import GuardConfig
from byzguard.guard import Guard
from tables import RouteTables, declare_route_tables
from topics import RouteTopics, declare_route_topics

log = logging.getLogger(__name__)


@dataclass
class GuardApp:
    """The faust App and what was declared on it, by route name."""

    app: faust.App
    guard: Guard
    topics: dict[str, RouteTopics] = field(default_factory=dict)
    tables: dict[str, RouteTables] = field(default_factory=dict)
    agents: dict[str, Any] = field(default_factory=dict)


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
        "topic_replication_factor": 1,
        "topic_allow_declare": True,
        "consumer_auto_offset_reset": "earliest",
        "broker_commit_interval": settings.commit_interval,
        "broker_commit_every": 10_000,
        "table_standby_replicas": 0,
        "autodiscover": False,
        "env": {},  # faust must not read BROKER_URL & co. from the environment behind our back
    }


def build_app(settings: Settings, config: GuardConfig, bootstrap: str) -> GuardApp:
    """Declare everything the worker runs on a new faust App."""
    app = faust.App(settings.app_id, **faust_options(settings, bootstrap))
    guard = Guard(config)
    built = GuardApp(app=app, guard=guard)
    for route in config.routes:
        topics = declare_route_topics(app, route)
        tables = declare_route_tables(app, route)
        built.topics[route.name] = topics
        built.tables[route.name] = tables
        built.agents[route.name] = attach_verify_agent(app, guard, route, topics, tables)

    @app.page("/metrics")
    async def metrics_view(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/healthz")
    async def health_view(web: Any, request: Any) -> Any:
        return web.json({"status": "ok", "routes": [r.name for r in config.routes]})

    return built
