"""What `byzguard run` prints in the first two minutes: a score readable at 80 columns, and, after the worker
stops, that the local broker keeps running and how to stop it."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from app.dev.demo import AUDIT_SCORED, DEMO_AUDIT_WINDOW, DemoResult, Where, demo_config, render_result
from app.dev.faults import SPECS, Fate, FaultClass, score
from byzguard.config import load

REPO = Path(__file__).resolve().parents[2]


def demo_result() -> DemoResult:
    """A run where every fault class was caught with its expected codes and 1,657 clean events passed, partial
    writes by the orders audit with the demo's window."""
    report = score([], [])
    for fault in FaultClass:
        row = report.rows[fault.value]
        row.sent = row.fates[Fate.CAUGHT] = 25
        row.codes_seen.update(dict.fromkeys(row.expected_codes, 25))
    report.clean.sent = report.clean.fates[Fate.PASSED] = 1657
    rule = load(REPO / "byzguard.yaml", require_secrets=False).audit("orders_paid")
    assert rule is not None
    return DemoResult(report, [], "demo1a2b3c", 31.0, 20.0, 25, AUDIT_SCORED, None, {"pricing": "prices"},
                      {"prices.verified": "verified", "prices.quarantine": "quarantine"},
                      audit_rule=dataclasses.replace(rule, within=DEMO_AUDIT_WINDOW),
                      shortened={"orders_paid": (600.0, DEMO_AUDIT_WINDOW)})


@pytest.mark.parametrize("width", [80, 100])
def test_the_score_is_readable_at_80_columns(width: int) -> None:
    """At 80 (and 100) columns no cell is cut: every class name, count and expected code is printed whole."""
    buffer = io.StringIO()
    render_result(demo_result(), Where("http://127.0.0.1:6066"), Console(file=buffer, width=width))
    text = buffer.getvalue()
    assert "…" not in text
    assert all(len(line) <= width for line in text.splitlines())
    words = set(text.split())
    for fault in FaultClass:
        assert fault.value in words
        assert all(code in text for code in SPECS[fault].codes), fault
    assert "25/25" in words and "1657/1657" in words


def test_after_the_worker_stops_it_says_the_local_broker_keeps_running(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """`byzguard run` with the local broker says, when its worker stops (Ctrl-C), that the broker still runs and
    how to stop it."""
    import app.dev.demo
    import app.dev.localkafka
    from app.cli import cli

    monkeypatch.setattr(app.dev.localkafka, "ensure_running", lambda **announce: "127.0.0.1:19092")
    monkeypatch.setattr(app.dev.demo, "run_local", lambda settings, cfg, bootstrap: 130)  # what Ctrl-C returns
    monkeypatch.chdir(tmp_path)
    env = {name: None for name in ("BYZGUARD_BROKER", "BYZGUARD_KEY_PRICING_1", "BYZGUARD_KEY_ORDERS_1",
                                   "BYZGUARD_KEY_PAYMENTS_1")}
    result = CliRunner().invoke(cli, ["run", "--config", str(REPO / "byzguard.yaml")], env=env)
    assert result.exit_code == 130, result.output
    said = " ".join(result.output.split())
    assert "the local Kafka broker keeps running at 127.0.0.1:19092" in said
    assert "make broker-stop" in said and "python -m app.dev.localkafka stop" in said


def test_the_demo_worker_config_differs_from_the_users_only_in_the_orders_audit_window(tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker the demo starts runs a copy of byzguard.yaml whose orders audit waits the demo's 20 s; every
    other line, comment included, is the user's, and the user's file is not written."""
    monkeypatch.setenv("BYZGUARD_KEY_PRICING_1", "unit-test-secret")
    shipped = (REPO / "byzguard.yaml").read_text()
    demo = demo_config(REPO / "byzguard.yaml", tmp_path, DEMO_AUDIT_WINDOW)
    assert (REPO / "byzguard.yaml").read_text() == shipped
    assert demo.path.parent == tmp_path and demo.shortened == {"orders_paid": (600.0, 20.0)}
    written = demo.path.read_text().splitlines()
    header = [line for line in written if line not in shipped.splitlines()]
    assert [line for line in shipped.splitlines() if line not in written] == [
        "    within: 10m                # the payment may come up to 10 minutes before or after the order"]
    assert "    within: 20s  # byzguard demo: 10 min in byzguard.yaml, shortened for the demo's run" in header
    assert any("Production windows are longer" in line for line in header)
    rule = demo.config.audit("orders_paid")
    assert rule is not None and rule.within == 20.0 and rule.grace == 5.0
    user = load(REPO / "byzguard.yaml", require_secrets=False)
    assert [r.name for r in demo.config.routes] == [r.name for r in user.routes]


def test_the_demo_keeps_the_users_config_when_its_audit_window_is_short_enough(tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An orders audit already no longer than the demo's window, or no demo window at all (None): the worker runs
    the user's file itself and nothing is written."""
    monkeypatch.setenv("BYZGUARD_KEY_PRICING_1", "unit-test-secret")
    text = (REPO / "byzguard.yaml").read_text().replace("within: 10m ", "within: 15s ")
    path = tmp_path / "short.yaml"
    path.write_text(text)
    assert demo_config(path, tmp_path / "out", 20.0).path == path
    assert demo_config(REPO / "byzguard.yaml", tmp_path / "out", None).path == REPO / "byzguard.yaml"
    assert not (tmp_path / "out").exists()


def test_the_demo_shortens_an_audit_window_written_in_flow_style(tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An audit written as a flow mapping (`{..., within: 10m, grace: 5s}`) stays valid YAML with the demo's
    window, and its other keys keep their values."""
    monkeypatch.setenv("BYZGUARD_KEY_PRICING_1", "unit-test-secret")
    text = (REPO / "byzguard.yaml").read_text()
    start = text.index("  - name: orders_paid")
    flow = ("  - {name: orders_paid, within: 10m, grace: 7s, require: left, discrepancies_topic: audit.discrepancies,"
            " left: {name: orders, topic: orders.verified, type: order.confirmed, key: data.paymentId, value: "
            "data.total}, right: {name: payments, topic: orders.verified, type: payment.captured, key: "
            "data.paymentId, value: data.amount}}\n")
    path = tmp_path / "flow.yaml"
    path.write_text(text[:start] + flow)
    rule = demo_config(path, tmp_path / "out", 20.0).config.audit("orders_paid")
    assert rule is not None and (rule.within, rule.grace) == (20.0, 7.0)


def test_the_score_says_which_audit_window_judged_the_partial_writes() -> None:
    """When the demo's worker waited a shorter window than the configuration's, the table names the window used
    and the summary says the configured one is what a user's workers keep; no class is "pending"."""
    result = demo_result()
    buffer = io.StringIO()
    render_result(result, Where("http://127.0.0.1:6066"), Console(file=buffer, width=400))  # no cell wraps
    said = " ".join(buffer.getvalue().split())
    assert "audit orders_paid, 20 s window: payment missing" in said
    assert ("partial writes: judged by audit orders_paid with the demo's 20 s window; your configuration's 10 min "
            "is what your workers use") in said
    assert "pending" not in said


def test_a_partial_write_the_audit_has_not_judged_yet_is_shown_pending() -> None:
    """Against a worker whose orders audit waits longer than the demo (one already running), partial writes are
    "pending", never counted as caught or missed."""
    result = dataclasses.replace(demo_result(), audit="pending: audit 'orders_paid' waits 10 min for a payment, "
                                                      "longer than the demo waits")
    buffer = io.StringIO()
    render_result(result, Where("http://127.0.0.1:6066"), Console(file=buffer, width=200))
    row = next(line for line in buffer.getvalue().splitlines() if "partial_write" in line)
    assert "pending" in row and "25/25" not in row


def test_the_worker_make_run_keeps_runs_the_configuration_as_it_is(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`byzguard run`'s demo plays against a worker on the demo's copy of the configuration; the worker left
    running afterwards is started again on the user's file, whose audit window is the configured one."""
    import app.dev.demo
    from app.settings import Settings

    monkeypatch.setenv("BYZGUARD_KEY_PRICING_1", "unit-test-secret")
    started: list[Path] = []
    followed: list[Path] = []

    class Child:
        def __init__(self, config: Path) -> None:
            self.config = config

        def stop(self) -> int:
            return 0

    def start_worker(settings: Settings, bootstrap: str, console: Console) -> Child:
        started.append(Path(settings.config))
        return Child(Path(settings.config))

    monkeypatch.setattr(app.dev.demo, "http_get", lambda url, timeout=2.0: None)  # no worker answers yet
    monkeypatch.setattr(app.dev.demo, "start_worker", start_worker)
    monkeypatch.setattr(app.dev.demo, "_play_once", lambda bootstrap, config, options, where, console, shortened=None:
                        (config.audit("orders_paid"), options.audit_wait))
    monkeypatch.setattr(app.dev.demo, "_follow", lambda child, console: followed.append(child.config))
    settings = Settings(config=REPO / "byzguard.yaml", broker="127.0.0.1:1", data_dir=tmp_path / "data")
    user = load(REPO / "byzguard.yaml")
    rule, wait = app.dev.demo.play(settings, user, "127.0.0.1:1", app.dev.demo.DemoOptions(),
                                   Console(file=io.StringIO()), worker="start", keep_running=True)
    assert rule.within == DEMO_AUDIT_WINDOW and wait >= app.dev.demo.audit_horizon(rule)
    assert started == [tmp_path / "demo" / "byzguard.demo.yaml", REPO / "byzguard.yaml"]
    assert followed == [REPO / "byzguard.yaml"]
