"""How the worker chooses its runtime (settings `runtime`, BYZGUARD_RUNTIME), without a broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import Settings, SettingsError, load_settings
from byzguard.config import GuardConfig, load
from byzguard.errors import ConfigError


def _config(tmp_path: Path, extra: str = "") -> GuardConfig:
    path = tmp_path / "byzguard.yaml"
    path.write_text("routes:\n  - {name: r, inputs: [in], verified_topic: out, quarantine_topic: bad,\n"
                    f"      types: {{t: {{}}}}{extra}}}\n")
    return load(path)


def test_the_faust_runtime_is_the_default_and_batched_is_chosen_by_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unset, the routes run as faust agents; BYZGUARD_RUNTIME=batched chooses the batched loop with its batch
    bounds (1000 records, 100 ms by default); any other value is refused."""
    monkeypatch.delenv("BYZGUARD_RUNTIME", raising=False)
    assert Settings().runtime == "faust"
    monkeypatch.setenv("BYZGUARD_RUNTIME", "batched")
    settings = load_settings()
    assert (settings.runtime, settings.batch_max_records, settings.batch_max_ms) == ("batched", 1000, 100.0)
    monkeypatch.setenv("BYZGUARD_RUNTIME", "fast")
    with pytest.raises(SettingsError, match="BYZGUARD_RUNTIME"):
        load_settings()


def test_on_the_batched_runtime_faust_declares_no_route_table_or_agent(tmp_path: Path) -> None:
    """With runtime batched the App gets the batched runtime as a dependency (started before faust's consumer) and
    neither the routes' tables (their RocksDB files are the runtime's) nor verify agents; with faust, the agent and
    tables as before."""
    from app.runtime import BatchedRuntime
    from app.worker import build_app

    config = _config(tmp_path)
    batched = build_app(Settings(data_dir=tmp_path / "b", runtime="batched"), config, "127.0.0.1:9092")
    assert batched.tables == {} and batched.agents == {}
    assert isinstance(batched.app._children[0], BatchedRuntime)  # type: ignore[attr-defined]
    faust = build_app(Settings(data_dir=tmp_path / "f"), config, "127.0.0.1:9092")
    assert set(faust.tables) == {"r"} and set(faust.agents) == {"r"}
    assert not any(isinstance(s, BatchedRuntime) for s in faust.app._children)  # type: ignore[attr-defined]


def test_on_the_batched_runtime_faust_declares_no_audit_or_repartition_agent(tmp_path: Path) -> None:
    """A repartitioning route and an audit rule run on the batched runtime: faust declares neither their agents
    nor the audit's join table (so no tick timer either), and its own guarantee is at_least_once (it runs no stream);
    on the faust runtime they are faust agents as before."""
    from app.runtime import BatchedRuntime
    from app.worker import build_app

    path = tmp_path / "byzguard.yaml"
    path.write_text("routes:\n  - {name: r, inputs: [in], verified_topic: out, quarantine_topic: bad,\n"
                    "      partitioning: repartition, types: {a: {}, b: {}}}\n"
                    "audits:\n  - {name: ab, left: {topic: out, type: a, key: data.k}, right: {topic: out, type: b,"
                    " key: data.k}, within: 10s}\n")
    config = load(path)
    batched = build_app(Settings(data_dir=tmp_path / "b", runtime="batched", processing_guarantee="exactly_once"),
                        config, "127.0.0.1:9092")
    assert batched.agents == {} and not list(batched.app.tables)
    assert batched.app.conf.processing_guarantee.value == "at_least_once"
    assert any(isinstance(s, BatchedRuntime) for s in batched.app._children)  # type: ignore[attr-defined]
    faust = build_app(Settings(data_dir=tmp_path / "f"), config, "127.0.0.1:9092")
    assert set(faust.agents) == {"r", "audit:ab"}
    assert "audit-ab-pending_by_key" in list(faust.app.tables)


def test_a_memory_state_store_is_refused_by_the_batched_runtime(tmp_path: Path) -> None:
    """BYZGUARD_STATE_STORE=memory is not silently ignored by the batched runtime (its state is always in RocksDB):
    the worker refuses to start and says why; the faust runtime still takes it."""
    from app.worker import build_app

    config = _config(tmp_path)
    with pytest.raises(ConfigError, match="BYZGUARD_STATE_STORE=memory is not run by the batched runtime"):
        build_app(Settings(data_dir=tmp_path / "b", runtime="batched", state_store="memory"), config, "127.0.0.1:9092")
    build_app(Settings(data_dir=tmp_path / "f", state_store="memory"), config, "127.0.0.1:9092")
