"""`byzguard demo` end to end: the seed's services against a real worker process on the session's broker."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from app.dev.demo import (
    AUDIT_SCORED,
    DEMO_AUDIT_WINDOW,
    DemoOptions,
    Where,
    play,
    render_result,
    run_demo,
    start_worker,
    web_base,
)
from app.dev.faults import SPECS, Expect, Fate, FaultClass
from app.dev.localkafka import free_ports
from app.settings import Settings
from byzguard.config import load
from tests.conftest import unique_name

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
SECRET_ENV = "BYZGUARD_KEY_PRICING_1"


def documented_config_on_fresh_topics(tmp_path: Path, prefix: str, *, audit_window: str | None = "6s") -> Path:
    """byzguard.yaml with every topic renamed under `prefix` and its audit windows shortened to `audit_window`
    (None: as shipped)."""
    doc: dict[str, Any] = yaml.safe_load((REPO / "byzguard.yaml").read_text())
    renamed: dict[str, str] = {}

    def fresh(topic: str) -> str:
        return renamed.setdefault(topic, f"{prefix}-{topic}")

    for route in doc["routes"]:
        route["inputs"] = [fresh(t) for t in route["inputs"]]
        for field in ("verified_topic", "quarantine_topic", "receipts_topic"):
            if route.get(field):
                route[field] = fresh(route[field])
    for audit in doc.get("audits") or ():
        audit["left"]["topic"] = fresh(audit["left"]["topic"])
        audit["right"]["topic"] = fresh(audit["right"]["topic"])
        audit["discrepancies_topic"] = fresh(audit.get("discrepancies_topic", "audit.discrepancies"))
        if audit_window is not None:
            audit["within"] = audit_window
            audit["grace"] = "2s"
    path = tmp_path / "byzguard-demo.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def test_demo_catches_every_fault_class_with_its_code_and_loses_nothing(
        kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a worker running the documented configuration, every injected fault class is caught with an expected
    code (partial writes by the orders audit), no clean event is flagged and every record is accounted for."""
    app_id = unique_name("demo", kafka_bootstrap)
    monkeypatch.setenv(SECRET_ENV, "integration-demo-secret")
    config_path = documented_config_on_fresh_topics(tmp_path, app_id)
    settings = Settings(config=config_path, broker=kafka_bootstrap, app_id=app_id, data_dir=tmp_path / "data",
                        web_port=free_ports(1)[0], commit_interval=0.2)
    cfg = load(config_path)
    console = Console(file=io.StringIO(), width=200)
    worker = start_worker(settings, kafka_bootstrap, console)
    base = web_base(settings.web_host, settings.web_port)
    try:
        result = await run_demo(kafka_bootstrap, cfg, DemoOptions(events=700, rate=0.02, min_each=2, seed=5,
                                                                  eps=300, live=False, drain_timeout=120),
                                where=Where(base), console=console)
        series = await signals_after_the_demo(base)
    finally:
        code = worker.stop()
    report = result.report
    assert result.audit == AUDIT_SCORED, result.audit
    for fault in FaultClass:
        row = report.rows[fault.value]
        assert row.sent >= 2, fault
        assert row.caught == row.sent, (fault.value, dict(row.fates), dict(row.codes_seen), worker.log_tail())
        if SPECS[fault].expect is not Expect.AUDIT and fault is not FaultClass.DUPLICATE:
            assert set(row.codes_seen) & {c.value for c in SPECS[fault].codes}, (fault.value, row.codes_seen)
    flagged = [(lb.detail, result.audited.get(lb.subject)) for lb in result.labels
               if report.fates[lb.seq] is Fate.FALSE_POSITIVE]
    assert report.false_positives() == 0, flagged
    assert report.clean.fates[Fate.PASSED] == report.clean.sent > 400
    assert report.unaccounted() == 0 and report.extra == 0
    duplicates = sum(1 for lb in result.labels if lb.fault is FaultClass.DUPLICATE)
    assert result.duplicates_counted == duplicates  # a fresh worker counts exactly the injected ones
    assert result.ok()
    # The final table's counts agree with each other: every event sent is in one row, and the false-positive
    # line counts the clean row plus the partial-write orders.
    out = Console(file=io.StringIO(), width=200)
    render_result(result, Where(base), out)
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert sum(row.sent for row in report.rows.values()) == len(result.labels)  # rows include "clean"
    assert f": {len(result.labels)} events in " in text
    partial = report.rows[FaultClass.PARTIAL_WRITE.value].sent
    assert f"of the {report.clean.sent + partial} events that must pass ({report.clean.sent} clean + {partial} " in text
    # Every metric a dashboard panel or an alert reads carries data, and those the demo exercises are non-zero.
    empty = {name for name in signal_metrics() if name not in series}
    assert empty == set(), empty
    idle = {name for name in signal_metrics() - MAY_STAY_ZERO if not any(series[name].values())}
    assert idle == set(), {name: series[name] for name in idle}
    assert series["byzguard_quarantine_backlog_records"][("status", "pending")] > 0
    # INFO is for what an operator acts on: between start-up and shutdown nothing is logged per event.
    log = worker.log_path.read_text(errors="replace")
    running = log[log.find("[^Worker]: Ready"):log.find("Stopping...", log.find("[^Worker]: Ready"))]
    info = [line for line in running.splitlines() if "[INFO]" in line]
    assert len(info) < 30, f"{len(info)} INFO lines while {len(result.labels)} events ran:\n" + "\n".join(info[:30])
    assert code == 0, worker.log_tail()


@pytest.mark.slow
def test_a_demo_that_starts_its_worker_catches_partial_writes_without_touching_the_configured_window(
        kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With byzguard.yaml's own 10-minute orders audit, a demo that starts its worker (as `make run` does) runs it
    with the demo's 20 s window: every class, partial writes included, is caught within the run, nothing is
    "pending", the table says which window judged them, and the user's file is left as it was."""
    app_id = unique_name("demo", kafka_bootstrap)
    monkeypatch.setenv(SECRET_ENV, "integration-demo-secret")
    config_path = documented_config_on_fresh_topics(tmp_path, app_id, audit_window=None)
    shipped = config_path.read_text()
    cfg = load(config_path)
    assert cfg.audit("orders_paid") is not None and cfg.audit("orders_paid").within == 600.0  # type: ignore[union-attr]
    settings = Settings(config=config_path, broker=kafka_bootstrap, app_id=app_id, data_dir=tmp_path / "data",
                        web_port=free_ports(1)[0], commit_interval=0.2)
    console = Console(file=io.StringIO(), width=200)
    started = time.monotonic()
    result = play(settings, cfg, kafka_bootstrap, DemoOptions(events=400, rate=0.02, min_each=2, seed=11, eps=300,
                                                              live=False, drain_timeout=60), console, worker="start")
    seconds = time.monotonic() - started
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert config_path.read_text() == shipped
    assert result.audit == AUDIT_SCORED, result.audit
    assert result.audit_rule is not None and result.audit_rule.within == DEMO_AUDIT_WINDOW
    assert result.shortened == {"orders_paid": (600.0, DEMO_AUDIT_WINDOW)}
    report = result.report
    for fault in FaultClass:
        row = report.rows[fault.value]
        assert row.sent >= 2 and row.caught == row.sent, (fault.value, dict(row.fates), dict(row.codes_seen))
    assert report.rows[FaultClass.PARTIAL_WRITE.value].codes_seen["audit.missing"] >= 2
    assert report.false_positives() == 0 and report.unaccounted() == 0 and result.ok()
    said = " ".join(text.split())
    assert "pending" not in said
    assert "partial writes: judged by audit orders_paid with the demo's 20 s window; your configuration's 10 min" \
        in said
    assert seconds < 150, f"the demo took {seconds:.0f} s"


#: Signals a clean demo run leaves at 0: nothing held (no causal route), no fallback served, no lag once drained.
MAY_STAY_ZERO = {"byzguard_causal_buffer_events", "byzguard_causal_buffer_oldest_age_seconds",
                 "byzguard_last_good_served_total", "byzguard_consumer_lag_messages"}


def signal_metrics() -> set[str]:
    """Every metric the shipped Grafana dashboard or Prometheus alerting rules read, from those files."""
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/byzguard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    exprs += [r["expr"] for g in yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())["groups"]
              for r in g["rules"]]
    return {name for expr in exprs for name in re.findall(r"\b((?:byzguard|process)_[a-z0-9_]+)\b", expr)}


def scrape(url: str) -> str:
    """The body of a GET."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


async def signals_after_the_demo(base: str, timeout: float = 60.0) -> dict[str, dict[tuple[str, str], float]]:
    """The worker's samples by name, then (label, value) pair, summed; once the quarantine backlog has been
    counted (every 15 s)."""
    deadline = time.monotonic() + timeout
    while True:
        body = await asyncio.to_thread(scrape, f"{base}/metrics")
        series: dict[str, dict[tuple[str, str], float]] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                by_label = series.setdefault(sample.name, {})
                for pair in sample.labels.items() or [("", "")]:
                    by_label[pair] = by_label.get(pair, 0.0) + sample.value
        if series.get("byzguard_quarantine_backlog_records", {}).get(("status", "pending"), 0) > 0 \
                or time.monotonic() > deadline:
            return series
        await asyncio.sleep(1)
