"""Worker settings: one frozen object from BYZGUARD_* variables; faust's own variables cannot sneak in."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings
from app.worker import faust_options


def test_env_prefix_and_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """BYZGUARD_* variables set the fields, and the object cannot be changed afterwards."""
    monkeypatch.setenv("BYZGUARD_BROKER", "10.0.0.1:9092")
    monkeypatch.setenv("BYZGUARD_WEB_PORT", "7000")
    settings = Settings()
    assert (settings.broker, settings.web_port) == ("10.0.0.1:9092", 7000)
    with pytest.raises(ValidationError, match="frozen"):
        settings.web_port = 1  # type: ignore[misc]


def test_faust_environment_variables_do_not_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stray BROKER_URL or WEB_PORT in the environment does not change the faust App's settings."""
    import faust

    monkeypatch.setenv("BROKER_URL", "kafka://evil:1")
    monkeypatch.setenv("WEB_PORT", "1")
    monkeypatch.setenv("APP_DATADIR", "/evil")
    app = faust.App("t", **faust_options(Settings(), "127.0.0.1:9092"))
    assert str(app.conf.broker[0]) == "kafka://127.0.0.1:9092"
    assert app.conf.web_port == 6066
    assert "evil" not in str(app.conf.datadir)


def test_invalid_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value is refused at start with the field's name."""
    monkeypatch.setenv("BYZGUARD_PROCESSING_GUARANTEE", "maybe_once")
    with pytest.raises(Exception, match="processing_guarantee"):
        Settings()


def test_session_timeout_sets_faust_group_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """BYZGUARD_SESSION_TIMEOUT is how long a dead worker keeps its partitions; heartbeats go at a tenth of it."""
    monkeypatch.setenv("BYZGUARD_SESSION_TIMEOUT", "30")
    options = faust_options(Settings(), "127.0.0.1:9092")
    assert (options["broker_session_timeout"], options["broker_heartbeat_interval"]) == (30.0, 3.0)
    monkeypatch.setenv("BYZGUARD_SESSION_TIMEOUT", "2")  # below what a broker accepts by default
    with pytest.raises(Exception, match="session_timeout"):
        Settings()


def test_rocksdb_memory_settings_reach_every_table_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """BYZGUARD_ROCKSDB_* size the write buffers and block cache of each table's RocksDB store (faust's own
    defaults, 64 MB buffers and a 2 GB cache per partition, are what let a worker outgrow its memory)."""
    from app.worker import build_app
    from byzguard.config import load

    config = tmp_path / "byzguard.yaml"
    config.write_text("routes:\n  - {name: r, inputs: [in], verified_topic: out, quarantine_topic: bad,\n"
                      "      types: {t: {}}}\n")
    monkeypatch.setenv("BYZGUARD_ROCKSDB_WRITE_BUFFER_MB", "2")
    monkeypatch.setenv("BYZGUARD_ROCKSDB_BLOCK_CACHE_MB", "16")
    from faust.stores.rocksdb import RocksDBOptions

    built = build_app(Settings(data_dir=tmp_path / "data"), load(config), "127.0.0.1:9092")
    assert built.runtime is not None
    # What the batched runtime opens each table partition's database with (app/runtime/state.py).
    options = RocksDBOptions(**built.runtime.store_options)
    assert (options.write_buffer_size, options.max_write_buffer_number, options.block_cache_size) == (
        2 << 20, 4, 16 << 20)


def test_the_worker_waits_at_most_10_ms_for_a_fetch_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """faust's own 1500 ms wait held busy input partitions back behind a fetch of idle ones (bench/fetching.py)."""
    settings = Settings()
    assert (settings.fetch_min_bytes, settings.fetch_max_wait_ms) == (1, 10)
    monkeypatch.setenv("BYZGUARD_FETCH_MAX_WAIT_MS", "0")  # the broker would answer every fetch at once: a busy loop
    with pytest.raises(Exception, match="fetch_max_wait_ms"):
        Settings()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Run in an empty directory whose .env (if a test writes one) is read, as the worker reads its own; the
    developer's BYZGUARD_* variables are already gone (tests/conftest.py)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(Settings.model_config, "env_file", ".env")
    return monkeypatch


def test_every_bad_setting_is_one_line_naming_its_variable(clean_env: pytest.MonkeyPatch) -> None:
    """Bad values are reported together, one line each, by variable name, and a secret's value is never shown."""
    from app.settings import SettingsError, load_settings

    clean_env.setenv("BYZGUARD_WEB_PORT", "99999")
    clean_env.setenv("BYZGUARD_BROKER", "localhost")
    clean_env.setenv("BYZGUARD_REVIEW_TOKENS", "alice-has-no-token-s3cret")
    clean_env.setenv("BYZGUARD_LOG_LEVEL", "loud")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    problems = caught.value.problems
    assert len(problems) == 4, problems
    assert {p.split("=")[0].split(":")[0] for p in problems} == {
        "BYZGUARD_WEB_PORT", "BYZGUARD_BROKER", "BYZGUARD_REVIEW_TOKENS", "BYZGUARD_LOG_LEVEL"}
    assert not any("s3cret" in p for p in problems)
    assert any("is not host:port" in p for p in problems)


def test_a_command_line_option_is_named_as_the_option(clean_env: pytest.MonkeyPatch) -> None:
    """A bad --broker is reported as --broker, not as the variable it overrides."""
    from app.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="--broker='a:b:c'"):
        load_settings({"broker": "a:b:c"}, option_names={"broker": "--broker"})


def test_valid_broker_lists_are_accepted(clean_env: pytest.MonkeyPatch) -> None:
    """host:port lists, IPv6 in brackets and spaces after commas are bootstrap servers."""
    from app.settings import load_settings

    settings = load_settings({"broker": "kafka-1:9092, 10.0.0.2:9093,[::1]:9094"})
    assert settings.broker == "kafka-1:9092,10.0.0.2:9093,[::1]:9094"


def test_unknown_variables_are_reported_but_key_secrets_and_tool_variables_are_not(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A misspelled BYZGUARD_ variable is named with a suggestion; the configuration's key secrets, other BYZGUARD_KEY_
    variables and the variables of the CLI, local broker and test harness are not reported."""
    from app.settings import SettingsError, load_settings

    config = tmp_path / "byzguard.yaml"
    config.write_text("keys:\n  p-1: {source: pricing, secret_env: BYZGUARD_PRICING_SECRET}\nroutes: []\n")
    clean_env.setenv("BYZGUARD_CONFIG", str(config))
    for name in ("BYZGUARD_PRICING_SECRET", "BYZGUARD_KEY_OTHER_1", "BYZGUARD_DEMO", "BYZGUARD_REVIEWER",
                 "BYZGUARD_KAFKA_VERSION", "BYZGUARD_TEST_KAFKA", "BYZGUARD_CHAOS_SEED"):
        clean_env.setenv(name, "1")
    load_settings()
    clean_env.setenv("BYZGUARD_WEB_PROT", "7000")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.problems == ["BYZGUARD_WEB_PROT: unknown setting; did you mean BYZGUARD_WEB_PORT?"]


def test_unknown_variables_in_dotenv_are_reported(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """.env is read like the environment, so a misspelling there is reported too."""
    from app.settings import SettingsError, load_settings

    (tmp_path / ".env").write_text("BYZGUARD_BROKR=kafka:9092\n")
    with pytest.raises(SettingsError, match="BYZGUARD_BROKR: unknown setting; did you mean BYZGUARD_BROKER"):
        load_settings()


def test_the_cli_prints_problems_without_a_traceback(clean_env: pytest.MonkeyPatch) -> None:
    """`byzguard run` with a bad variable exits 2 with one line naming it and no traceback."""
    from typer.testing import CliRunner

    from app.cli import cli

    result = CliRunner().invoke(cli, ["run"], env={"BYZGUARD_WEB_PORT": "http"})
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("setting refused: BYZGUARD_WEB_PORT='http'"), result.output
