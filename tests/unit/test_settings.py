"""Worker settings: one frozen object from BYZGUARD_* variables; faust's own variables cannot sneak in."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import Settings
from app.worker import faust_options


def test_env_prefix_and_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """BYZGUARD_* variables set the fields, and the object cannot be changed afterwards."""
    monkeypatch.setenv("BYZGUARD_BROKER", "10.0.0.1:9092")
    monkeypatch.setenv("BYZGUARD_WEB_PORT", "7000")
    settings = Settings()
    assert (settings.broker, settings.web_port) == ("10.0.0.1:9092", 7000)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type is an implementation detail
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
    built = build_app(Settings(data_dir=tmp_path / "data"), load(config), "127.0.0.1:9092")
    tables = built.tables["r"]
    for table in (tables.state_by_entity, tables.lamport_by_source):
        options = table.data.rocksdb_options  # type: ignore[attr-defined]
        assert (options.write_buffer_size, options.max_write_buffer_number, options.block_cache_size) == (
            2 << 20, 4, 16 << 20)


def test_the_worker_waits_at_most_10_ms_for_a_fetch_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """faust's own 1500 ms wait held busy input partitions back behind a fetch of idle ones (app/fetching.py)."""
    settings = Settings()
    assert (settings.fetch_min_bytes, settings.fetch_max_wait_ms) == (1, 10)
    monkeypatch.setenv("BYZGUARD_FETCH_MAX_WAIT_MS", "0")  # the broker would answer every fetch at once: a busy loop
    with pytest.raises(Exception, match="fetch_max_wait_ms"):
        Settings()
