"""The command line refuses a bad configuration before anything starts, naming the file and line."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from app.cli import cli

runner = CliRunner()


def test_config_check_accepts_the_example() -> None:
    """`byzguard config check byzguard.yaml` passes on the shipped example."""
    result = runner.invoke(cli, ["config", "check", str(Path(__file__).parents[2] / "byzguard.yaml")],
                           env={"BYZGUARD_KEY_PRICING_1": "x"})
    assert result.exit_code == 0, result.output
    assert "configuration OK" in result.output


def test_run_refuses_bad_config_before_touching_kafka(tmp_path: Path) -> None:
    """`byzguard run` with a wrong field exits 2 with file:line and the field, without contacting a broker."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes:\n  - name: r\n    inputs: [a]\n    verified_topic: b\n    quarantine_topic: c\n"
                   "    policy: sometimes\n")
    result = runner.invoke(cli, ["run", "--config", str(bad), "--broker", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert f"{bad}:6" in result.output.replace("\n", "")
    assert "routes.0.policy" in result.output
