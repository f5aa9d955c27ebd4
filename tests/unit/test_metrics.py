"""The worker's Prometheus metrics (app/metrics.py), the Grafana dashboard and the alerting rules that read them."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from app import metrics
from byzguard import config as guard_config
from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/grafana/dashboards/byzguard.json"
ALERTS = REPO / "deploy/prometheus/alerts.yml"
ALERTS_TEST = REPO / "deploy/prometheus/alerts_test.yml"


@pytest.fixture
def promtool() -> str:
    """promtool (Debian's package prometheus, which `make test` installs when run as root)."""
    return require("promtool", "Debian package prometheus; `make test` installs it when run as root")


# Label names that would make a series per entity or per event: never on a byzguard metric.
UNBOUNDED_LABELS = {"id", "event_id", "entity", "entity_id", "subject", "key", "offset", "quarantine_id"}

CONFIG = """
defaults: {max_age: 24h}
keys:
  pricing-1: {source: pricing, secret_env: K}
routes:
  - name: prices
    inputs: [prices]
    verified_topic: prices.verified
    quarantine_topic: prices.quarantine
    default_type: price.updated
    types:
      price.updated: {sources: [pricing], key_ids: [pricing-1]}
  - name: orders
    inputs: [orders, payments]
    verified_topic: orders.verified
    quarantine_topic: orders.quarantine
    types:
      order.confirmed: {sources: [orders]}
      role.changed: {sources: [permissions], max_age: 1h}
"""


def exported_types() -> dict[str, str]:
    """Metric family name -> type, as the exposition declares them."""
    text = generate_latest(metrics.REGISTRY).decode()
    # prometheus_client adds a `<name>_created` gauge per counter and histogram: not a metric of its own.
    return {n: t for n, t in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE)
            if not n.endswith("_created")}


def byzguard_metrics() -> list[Any]:
    return [m for m in metrics.REGISTRY.collect() if m.name.startswith("byzguard_")]


def populate() -> None:
    """Give every labelled byzguard metric one sample, as a running worker would."""
    metrics.EVENTS.labels("prices", "price.updated", "verified").inc()
    metrics.CHECK_FAILURES.labels("prices", "invariant", "invariant.violated", "reject", "pricing").inc()
    metrics.VERSION_REGRESSIONS.labels("prices", "price.updated").inc()
    metrics.VERIFY_SECONDS.labels("prices").observe(0.0002)
    metrics.DATA_AGE.labels("prices", "price.updated").observe(3.0)
    metrics.CAUSAL_HELD.labels("orders").set(0)
    metrics.CAUSAL_OLDEST.labels("orders").set(0)
    metrics.QUARANTINE_BACKLOG.labels("prices", "pending").set(2)
    metrics.AUDIT_CHECKS.labels("orders_paid").inc()
    metrics.AUDIT_AGREEMENT.labels("orders_paid").set(0.99)
    metrics.LAST_GOOD_SERVED.labels("prices", "price.updated").inc()
    metrics.CONSUMER_LAG.labels("prices", "0").set(5)
    metrics.TYPE_MAX_AGE.labels("prices", "price.updated").set(86400)


def test_metric_names_follow_prometheus_conventions() -> None:
    """Every byzguard metric is prefixed, counters end in _total, and gauges/histograms name their unit."""
    populate()
    types = exported_types()
    names = {n: t for n, t in types.items() if n.startswith("byzguard_")}
    assert len(names) >= 14
    for name, kind in names.items():
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
            assert re.search(r"_(seconds|records|events|messages|ratio|bytes)$", name), f"{name}: no unit suffix"


def test_no_metric_has_a_per_entity_or_per_event_label() -> None:
    """Label names are bounded: never an entity id, event id or offset."""
    for family in byzguard_metrics():
        for sample in family.samples:
            assert not UNBOUNDED_LABELS & set(sample.labels), (family.name, sample.labels)


def test_exposition_passes_promtool_check_metrics(promtool: str) -> None:
    """The /metrics text of a worker with samples in every metric passes `promtool check metrics`."""
    populate()
    body = generate_latest(metrics.REGISTRY)
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_event_derived_labels_are_bounded_by_the_configuration() -> None:
    """Types and sources the configuration does not name are counted as "other"; max ages are published."""
    cfg = guard_config.loads(textwrap.dedent(CONFIG), environ={"K": "secret"})
    metrics.configure(cfg)
    assert metrics.type_label("prices", "price.updated") == "price.updated"
    assert metrics.type_label("prices", "order.confirmed") == metrics.OTHER  # another route's type
    assert metrics.type_label("orders", "made.up.type.123") == metrics.OTHER
    assert metrics.source_label("pricing") == "pricing"
    assert metrics.source_label("permissions") == "permissions"
    assert metrics.source_label("attacker-7f3a") == metrics.OTHER
    assert metrics.TYPE_MAX_AGE.labels("orders", "role.changed")._value.get() == 3600
    assert metrics.TYPE_MAX_AGE.labels("orders", metrics.OTHER)._value.get() == 86400


def test_an_unknown_type_and_source_are_counted_as_other() -> None:
    """agents.verify.observe labels an event of an unconfigured type from an unknown source as other/other."""
    from agents.verify import observe
    from byzguard.engine import Decision
    from byzguard.envelope import Envelope
    from byzguard.guard import RecordIn, Routed
    from byzguard.verdict import Code, Outcome, Reason

    cfg = guard_config.loads(textwrap.dedent(CONFIG), environ={"K": "secret"})
    metrics.configure(cfg)
    env = Envelope(id="e1", source="intruder", type="weird.type", subject="s1", mode="binary", covered=b"{}")
    decision = Decision(Outcome.QUARANTINED, (Reason(Code.SOURCE_NOT_ALLOWED, "no"),))
    before = metrics.CHECK_FAILURES.labels("prices", "authorization", "source.not_allowed", "reject",
                                           "other")._value.get()
    observe("prices", Routed(RecordIn(b"s1", b"{}", [], "prices", 0, 1), decision, env, None, []), 1.0)
    assert metrics.EVENTS.labels("prices", "other", "quarantined")._value.get() >= 1
    after = metrics.CHECK_FAILURES.labels("prices", "authorization", "source.not_allowed", "reject",
                                          "other")._value.get()
    assert after == before + 1


# ---------------------------------------------------------------------------------- dashboard


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (byzguard_* and process_* series)."""
    return set(re.findall(r"\b((?:byzguard|process)_[a-z0-9_]+)\b", expr))


def known_series() -> set[str]:
    """Every series name the registry exports, histograms with their _bucket, _sum and _count."""
    names = set()
    for name, kind in exported_types().items():
        names.add(name)
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    return names


def test_dashboard_is_a_provisionable_grafana_dashboard() -> None:
    """The dashboard JSON has a uid, a schema version, and every panel a Prometheus datasource and queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "byzguard" and dashboard["schemaVersion"] >= 36
    assert "id" not in dashboard or dashboard["id"] is None  # provisioned dashboards get their id from Grafana
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "route"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]


def test_dashboard_queries_only_metrics_the_worker_exports() -> None:
    """Every metric a panel or annotation queries is in app/metrics.py's registry."""
    populate()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard) + [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    used = set().union(*(metric_names(e) for e in exprs))
    assert used - known_series() == set()
    shown = {
        "byzguard_events_total", "byzguard_check_failures_total", "byzguard_version_regressions_total",
        "byzguard_data_age_seconds_bucket", "byzguard_verify_duration_seconds_bucket", "byzguard_causal_buffer_events",
        "byzguard_causal_buffer_oldest_age_seconds", "byzguard_quarantine_backlog_records",
        "byzguard_audit_agreement_ratio", "byzguard_audit_discrepancies_total", "byzguard_consumer_lag_messages",
        "byzguard_last_good_served_total", "byzguard_type_max_age_seconds",
    }
    assert shown - used == set()


def test_dashboard_has_the_seeds_three_views() -> None:
    """A freshness heatmap over the data-age buckets, an invariant-violation timeline and the agreement rate."""
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    heatmap = panels["Data freshness heatmap"]
    assert heatmap["type"] == "heatmap" and heatmap["targets"][0]["format"] == "heatmap"
    assert "byzguard_data_age_seconds_bucket" in heatmap["targets"][0]["expr"]
    assert 'check="invariant"' in panels["Invariant-violation timeline"]["targets"][0]["expr"]
    assert "byzguard_audit_agreement_ratio" in panels["Cross-service agreement rate"]["targets"][0]["expr"]
    for title in ("Throughput by outcome", "Quarantine rate by reason", "Consumer lag per partition"):
        assert title in panels


# ---------------------------------------------------------------------------------- alerts


def test_alerts_read_only_metrics_the_worker_exports() -> None:
    """Every metric an alerting rule reads exists (besides Prometheus' own `up`)."""
    populate()
    import yaml

    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {
        "ByzguardInvariantViolations", "ByzguardVersionRegressions", "ByzguardQuarantineBacklogGrowing",
        "ByzguardDataStale", "ByzguardAuditAgreementLow", "ByzguardWorkerNotConsuming"}
    for rule in rules:
        assert metric_names(rule["expr"]) - known_series() == set(), rule["alert"]
        assert rule["labels"]["severity"] in ("page", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alerting_rules_pass_promtool_check_and_their_unit_tests(promtool: str) -> None:
    """`promtool check rules` accepts alerts.yml and `promtool test rules` passes alerts_test.yml."""
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert test.returncode == 0, test.stdout + test.stderr
