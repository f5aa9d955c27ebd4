"""The worker's one runtime (the batched loop, app/runtime) and the settings of the removed faust agent runtime,
without a broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import Settings, SettingsError, load_settings
from byzguard.config import load


def test_the_batched_runtime_runs_unset_or_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset or `batched`, BYZGUARD_RUNTIME runs the routes in the batched loop with its batch bounds (1000
    records, 100 ms by default); any other value is refused."""
    monkeypatch.delenv("BYZGUARD_RUNTIME", raising=False)
    settings = load_settings()
    assert (settings.runtime, settings.batch_max_records, settings.batch_max_ms) == ("batched", 1000, 100.0)
    assert settings.batch_overlap is True
    monkeypatch.setenv("BYZGUARD_BATCH_OVERLAP", "false")
    assert load_settings().batch_overlap is False
    monkeypatch.delenv("BYZGUARD_BATCH_OVERLAP")
    monkeypatch.setenv("BYZGUARD_RUNTIME", "batched")
    assert load_settings().runtime == "batched"
    monkeypatch.setenv("BYZGUARD_RUNTIME", "fast")
    with pytest.raises(SettingsError, match="BYZGUARD_RUNTIME='fast'"):
        load_settings()


def test_the_commit_and_step_intervals_have_bounds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """BYZGUARD_COMMIT_INTERVAL (at_least_once: seconds between offset commits at most, 0.1 by default) and
    BYZGUARD_STEP_INTERVAL_MS (the loop fetches at most once per it, 10 ms by default, 0: back to back) reach the
    runtime; values out of their bounds are refused at start with the setting's name."""
    from app.worker import build_app

    monkeypatch.delenv("BYZGUARD_COMMIT_INTERVAL", raising=False)
    monkeypatch.delenv("BYZGUARD_STEP_INTERVAL_MS", raising=False)
    settings = load_settings()
    assert (settings.commit_interval, settings.step_interval_ms) == (0.1, 10.0)
    for name, value in (("COMMIT_INTERVAL", "0"), ("COMMIT_INTERVAL", "61"), ("STEP_INTERVAL_MS", "-1"),
                        ("STEP_INTERVAL_MS", "1001")):
        monkeypatch.setenv(f"BYZGUARD_{name}", value)
        with pytest.raises(SettingsError, match=f"BYZGUARD_{name}={value!r}"):
            load_settings()
        monkeypatch.delenv(f"BYZGUARD_{name}")
    config = tmp_path / "byzguard.yaml"
    config.write_text("routes:\n  - {name: r, inputs: [in], verified_topic: out, quarantine_topic: bad,\n"
                      "      types: {t: {}}}\n")
    monkeypatch.setenv("BYZGUARD_COMMIT_INTERVAL", "0.25")
    monkeypatch.setenv("BYZGUARD_STEP_INTERVAL_MS", "0")
    built = build_app(load_settings().model_copy(update={"data_dir": tmp_path / "data"}), load(config),
                      "127.0.0.1:9092")
    assert built.runtime is not None
    assert (built.runtime.commit_interval, built.runtime.step_interval) == (0.25, 0.0)


def test_a_stale_faust_runtime_setting_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """BYZGUARD_RUNTIME=faust (the agent runtime earlier releases had) is refused at start, in the line of that
    variable, saying the runtime was removed and to unset it; so is BYZGUARD_STATE_STORE=memory, its store."""
    monkeypatch.setenv("BYZGUARD_RUNTIME", "faust")
    monkeypatch.setenv("BYZGUARD_STATE_STORE", "memory")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    runtime, store = sorted(raised.value.problems)
    assert runtime == ("BYZGUARD_RUNTIME='faust': the faust agent runtime was removed; unset BYZGUARD_RUNTIME (the "
                       "batched runtime is the only one; its state is the faust runtime's, docs/operations.md)")
    assert store.startswith("BYZGUARD_STATE_STORE='memory': the memory store went with the faust agent runtime; "
                            "unset BYZGUARD_STATE_STORE"), store



def test_a_livelock_timeout_of_any_value_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """BYZGUARD_LIVELOCK_TIMEOUT (faust's livelock check, which has nothing to check since faust's consumer reads no
    route) is refused at start whatever its value, in the line of that variable, saying to unset it; unset, the
    settings load."""
    monkeypatch.delenv("BYZGUARD_LIVELOCK_TIMEOUT", raising=False)
    assert load_settings().livelock_timeout is None
    for value in ("3", "300", ""):
        monkeypatch.setenv("BYZGUARD_LIVELOCK_TIMEOUT", value)
        with pytest.raises(SettingsError) as raised:
            load_settings()
        assert raised.value.problems == [
            f"BYZGUARD_LIVELOCK_TIMEOUT={value!r}: faust's livelock check went with the faust agent runtime (faust's "
            "consumer reads no route, so it has nothing to check); unset BYZGUARD_LIVELOCK_TIMEOUT "
            "(docs/operations.md)"]

def test_faust_declares_no_route_table_or_agent_and_runs_the_batched_runtime(tmp_path: Path) -> None:
    """The App gets the batched runtime as a dependency (started before faust's consumer) and neither a table nor an
    agent of its own, for a repartitioning route and an audit rule too (their stages are the runtime's); faust's
    own guarantee is at_least_once (it runs no stream; the runtime's transactions are its own)."""
    from app.runtime import BatchedRuntime
    from app.worker import build_app

    path = tmp_path / "byzguard.yaml"
    path.write_text("routes:\n  - {name: r, inputs: [in], verified_topic: out, quarantine_topic: bad,\n"
                    "      partitioning: repartition, types: {a: {}, b: {}}}\n"
                    "audits:\n  - {name: ab, left: {topic: out, type: a, key: data.k}, right: {topic: out, type: b,"
                    " key: data.k}, within: 10s}\n")
    built = build_app(Settings(data_dir=tmp_path / "b", processing_guarantee="exactly_once"), load(path),
                      "127.0.0.1:9092")
    assert not list(built.app.tables) and not list(built.app.agents)
    assert built.app.conf.processing_guarantee.value == "at_least_once"
    assert isinstance(built.app._children[0], BatchedRuntime)  # type: ignore[attr-defined]
    assert built.runtime is built.app._children[0] and built.owners is not None  # type: ignore[attr-defined]
