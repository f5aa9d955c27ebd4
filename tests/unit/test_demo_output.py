"""What `byzguard run` prints in the first two minutes: a score readable at 80 columns, and, after the worker
stops, that the local broker keeps running and how to stop it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from app.demo import AUDIT_SCORED, DemoResult, Where, render_result
from byzguard.faults import SPECS, Fate, FaultClass, score

REPO = Path(__file__).resolve().parents[2]


def demo_result() -> DemoResult:
    """A run where every fault class was caught with its expected codes and 1,657 clean events passed."""
    report = score([], [])
    for fault in FaultClass:
        row = report.rows[fault.value]
        row.sent = row.fates[Fate.CAUGHT] = 25
        row.codes_seen.update(dict.fromkeys(row.expected_codes, 25))
    report.clean.sent = report.clean.fates[Fate.PASSED] = 1657
    return DemoResult(report, [], "demo1a2b3c", 31.0, 20.0, 25, AUDIT_SCORED, None, {"pricing": "prices"},
                      {"prices.verified": "verified", "prices.quarantine": "quarantine"})


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
    import app.demo
    import app.localkafka
    from app.cli import cli

    monkeypatch.setattr(app.localkafka, "ensure_running", lambda: "127.0.0.1:19092")
    monkeypatch.setattr(app.demo, "run_local", lambda settings, cfg, bootstrap: 130)  # what Ctrl-C returns
    monkeypatch.chdir(tmp_path)
    env = {name: None for name in ("BYZGUARD_BROKER", "BYZGUARD_KEY_PRICING_1", "BYZGUARD_KEY_ORDERS_1",
                                   "BYZGUARD_KEY_PAYMENTS_1")}
    result = CliRunner().invoke(cli, ["run", "--config", str(REPO / "byzguard.yaml")], env=env)
    assert result.exit_code == 130, result.output
    said = " ".join(result.output.split())
    assert "the local Kafka broker keeps running at 127.0.0.1:19092" in said
    assert "make broker-stop" in said and "python -m app.localkafka stop" in said
