"""The command line refuses a bad configuration before anything starts, naming the file and line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
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


def test_config_check_needs_no_mac_secret(tmp_path: Path) -> None:
    """`config check` passes without the keys' secrets and names the unset variables (only a worker needs them)."""
    config = tmp_path / "byzguard.yaml"
    config.write_text("keys:\n  p-1: {source: pricing, secret_env: BYZGUARD_KEY_UNSET_HERE}\n"
                      "routes:\n  - {name: r, inputs: [a], verified_topic: b, quarantine_topic: c, types: {t: {}}}\n")
    result = runner.invoke(cli, ["config", "check", str(config)], env={"BYZGUARD_KEY_UNSET_HERE": None})
    assert result.exit_code == 0, result.output
    assert "BYZGUARD_KEY_UNSET_HERE not set here" in result.output
    assert "configuration OK" in result.output


def test_config_check_shows_declared_writers_and_lenient_integrity_forms(tmp_path: Path) -> None:
    """`config check` names the source an input declares and each source's integrity forms besides bound."""
    config = tmp_path / "byzguard.yaml"
    config.write_text("sources:\n  web-shop: {forms: [js-sorted, value-only]}\n  strict: {forms: []}\n"
                      "routes:\n  - {name: r, inputs: [a, {topic: w, source: web-shop}], verified_topic: b, "
                      "quarantine_topic: c, types: {t: {}}}\n")
    result = runner.invoke(cli, ["config", "check", str(config)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "inputs ['a', 'w (written by web-shop)']" in output
    assert "source web-shop: also accepts integrity forms ['js-sorted', 'value-only']" in output
    assert "source strict" not in output


def test_local_mode_keeps_its_made_up_secrets_for_the_next_run(tmp_path: Path) -> None:
    """Local mode makes up a missing MAC secret once, keeps it in a file only the user can read, and the next run
    and the read-only tools reuse it; a variable that is set always wins."""
    import stat

    from app.dev.local_secrets import use_local_secrets

    config = tmp_path / "byzguard.yaml"
    config.write_text("keys:\n  p-1: {source: pricing, secret_env: KEY_P}\n  o-1: {source: orders, secret_env: KEY_O}\n"
                      "routes: []\n")
    kept = tmp_path / ".cache" / "local-secrets.json"
    first: dict[str, str] = {"KEY_O": "mine"}
    assert use_local_secrets(config, first, path=kept) == (["KEY_P"], [])
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    second: dict[str, str] = {}
    assert use_local_secrets(config, second, path=kept, make_up=False) == ([], ["KEY_P"])
    assert second == {"KEY_P": first["KEY_P"]}, "a tool after the run sees the same secret; KEY_O was never kept"
    third: dict[str, str] = {"KEY_P": "set"}
    use_local_secrets(config, third, path=kept)
    assert third["KEY_P"] == "set"


def test_without_the_development_tools_run_needs_a_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where app/dev/ is left out (the image), `run` without a broker exits 2 saying local mode needs a checkout,
    instead of failing on an import; `demo` likewise."""
    monkeypatch.setitem(sys.modules, "app.dev", None)  # `import app.dev` now fails, as in the image
    config = Path(__file__).parents[2] / "byzguard.yaml"
    result = runner.invoke(cli, ["run", "--config", str(config)], env={"BYZGUARD_BROKER": None,
                                                                        "BYZGUARD_KEY_PRICING_1": "x"})
    assert result.exit_code == 2, result.output
    assert "no broker configured" in result.output and "app/dev/ is left out" in result.output
    demo = runner.invoke(cli, ["demo", "--config", str(config)], env={"BYZGUARD_BROKER": None})
    assert demo.exit_code == 2 and "app/dev/ is left out" in demo.output, demo.output


def test_without_the_development_tools_no_local_broker_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI tools' fallback to the local broker finds none where app/dev/ is left out (no import error)."""
    from app.settings import dev_tools_installed, running_local_broker

    assert dev_tools_installed()
    monkeypatch.setitem(sys.modules, "app.dev", None)
    assert not dev_tools_installed() and running_local_broker() is None


def test_the_tables_a_crashed_faust_runtime_worker_left_are_discarded_once(tmp_path: Path) -> None:
    """A data dir whose faust-runtime worker (an earlier release) did not stop cleanly still has its running marker:
    its table dir (which may hold writes of aborted transactions) is dropped once, with the marker; a data dir
    without the marker keeps its tables."""
    from app.cli import FAUST_RUNNING_MARKER, discard_tables_of_a_crashed_faust_worker

    tables = tmp_path / "app-data" / "v1" / "tables"
    (tables / "r-state_by_entity-0.db").mkdir(parents=True)
    assert not discard_tables_of_a_crashed_faust_worker(tmp_path, tables)
    assert tables.exists()
    (tmp_path / FAUST_RUNNING_MARKER).write_text("123\n")
    assert discard_tables_of_a_crashed_faust_worker(tmp_path, tables)
    assert not tables.exists() and not (tmp_path / FAUST_RUNNING_MARKER).exists()
    assert not discard_tables_of_a_crashed_faust_worker(tmp_path, tables)
