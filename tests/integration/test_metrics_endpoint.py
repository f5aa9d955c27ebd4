"""A worker's /metrics endpoint on the real broker: what it counts, how it labels it, and that Prometheus accepts it."""

from __future__ import annotations

import asyncio
import io
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from app.dev.demo import start_worker, web_base
from app.dev.localkafka import free_ports
from app.settings import Settings
from byzguard.client.producer import GuardedProducer
from byzguard.integrity import HMAC_SHA256, Key
from tests.conftest import require, unique_name
from tests.integration.test_demo import SECRET_ENV, documented_config_on_fresh_topics

pytestmark = pytest.mark.kafka

SECRET = "metrics-endpoint-secret"


def scrape(url: str) -> tuple[str, str]:
    """(content type, body) of a GET."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.headers.get("Content-Type", ""), response.read().decode()


def samples(body: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(body) for s in f.samples]


async def test_metrics_endpoint_counts_labels_boundedly_and_reports_lag(
        kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a few events, /metrics counts them by route, type and outcome, names unknown types and sources
    "other", has freshness and latency histograms and a lag gauge per assigned input partition (and, on the
    batched runtime, per partition its audit stages read), and passes `promtool check metrics`."""
    promtool = require("promtool", "Debian package prometheus; `make test` installs it when run as root")
    app_id = unique_name("metrics", kafka_bootstrap)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config_path = documented_config_on_fresh_topics(tmp_path, app_id)
    settings = Settings(config=config_path, broker=kafka_bootstrap, app_id=app_id, data_dir=tmp_path / "data",
                        web_port=free_ports(1)[0], commit_interval=0.2)
    base = web_base(settings.web_host, settings.web_port)
    worker = start_worker(settings, kafka_bootstrap, Console(file=io.StringIO()))
    try:
        key = Key("pricing-1", "pricing", SECRET.encode())
        now = time.time()
        async with GuardedProducer(kafka_bootstrap, source="pricing", algorithm=HMAC_SHA256, key=key) as pricing, \
                GuardedProducer(kafka_bootstrap, source="orders") as orders, \
                GuardedProducer(kafka_bootstrap, source=f"intruder-{uuid.uuid4().hex[:6]}") as intruder:
            for i in range(5):
                await pricing.send(f"{app_id}-prices", {"productId": "sku-1", "price": 10.0 + i, "currency": "USD",
                                                         "lastUpdated": "2026-01-01T00:00:00Z"},
                                   type="price.updated", subject="sku-1", version=i + 1, time=now - 30)
            # A type the configuration does not name (refused: type.unlisted, counted as "other"), and a source it
            # does not know (refused: source.not_allowed).
            await orders.send(f"{app_id}-orders", {"x": 1}, type=f"made.up.{uuid.uuid4().hex[:6]}",
                              subject="thing-1", time=now)
            await intruder.send(f"{app_id}-orders", {"orderId": "o-1"}, type="order.confirmed", subject="o-1",
                                version=1, time=now)
        deadline = time.monotonic() + 90
        body = ""
        while time.monotonic() < deadline:
            if not worker.alive():
                pytest.fail(f"the worker died:\n{worker.log_tail(60)}")
            content_type, body = scrape(f"{base}/metrics")
            rows = samples(body)
            counted = sum(v for n, lb, v in rows if n == "byzguard_events_total")
            lags = [(lb, v) for n, lb, v in rows if n == "byzguard_consumer_lag_messages"]
            if counted >= 7 and lags and all(v == 0 for _, v in lags):
                break
            await asyncio.sleep(1)
        else:
            pytest.fail(f"metrics did not show 7 events and caught-up lag within 90 s:\n{body}\n{worker.log_tail()}")
    finally:
        code = worker.stop()
    assert content_type.startswith("text/plain")
    rows = samples(body)
    events = {(lb["route"], lb["type"], lb["outcome"]): v for n, lb, v in rows if n == "byzguard_events_total"}
    assert sum(v for (route, t, _), v in events.items() if (route, t) == ("prices", "price.updated")) == 5
    assert events[("orders", "other", "quarantined")] == 1
    assert events[("orders", "order.confirmed", "quarantined")] == 1
    sources = {lb["source"] for n, lb, _ in rows if n == "byzguard_check_failures_total"}
    assert "other" in sources and not any(s.startswith("intruder") for s in sources)
    assert any(n == "byzguard_data_age_seconds_bucket" and lb["type"] == "price.updated" and v == 5
               for n, lb, v in rows if lb.get("le") == "60.0")
    assert any(n == "byzguard_verify_duration_seconds_count" and v >= 5 for n, lb, v in rows)
    lag_partitions = {(lb["topic"], lb["partition"]) for n, lb, _ in rows if n == "byzguard_consumer_lag_messages"}
    inputs = {f"{app_id}-{t}" for t in ("prices", "orders", "payments", "permissions")}
    # On the batched runtime the audit's stages are read by the same consumer: the verified topic the documented
    # orders_paid audit reads and its repartition topic have a lag too (docs/operations.md, the metrics table).
    audit_inputs = {f"{app_id}-orders.verified", f"{app_id}-audit-orders_paid-repartition"}
    expected = inputs | audit_inputs
    assert {t for t, _ in lag_partitions} == expected, lag_partitions
    assert len({(t, p) for t, p in lag_partitions if t in inputs}) == 16  # 4 inputs x 4 partitions
    assert any(n == "byzguard_type_max_age_seconds" and lb["type"] == "role.changed" and v == 3600
               for n, lb, v in rows)
    check = await asyncio.to_thread(subprocess.run, [promtool, "check", "metrics"], input=body.encode(),
                                    capture_output=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    assert code == 0, worker.log_tail()
