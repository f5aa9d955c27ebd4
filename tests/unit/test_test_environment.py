"""The suite's environment: the developer's BYZGUARD_* variables and .env cannot change a result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HARNESS_VARIABLES, clear_developer_settings

ROOT = Path(__file__).resolve().parents[2]


def test_developer_settings_are_cleared_and_the_harness_variables_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """BYZGUARD_* settings go; the harness's variables and KAFKA_BOOTSTRAP_SERVERS stay."""
    monkeypatch.setenv("BYZGUARD_BROKER", "elsewhere:9092")
    monkeypatch.setenv("BYZGUARD_PROCESSING_GUARANTEE", "at_least_once")
    monkeypatch.setenv("BYZGUARD_KAFKA_VERSION", "4.1.1")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    clear_developer_settings(monkeypatch)
    assert "BYZGUARD_BROKER" not in os.environ and "BYZGUARD_PROCESSING_GUARANTEE" not in os.environ
    assert os.environ["BYZGUARD_KAFKA_VERSION"] == "4.1.1" and "BYZGUARD_KAFKA_VERSION" in HARNESS_VARIABLES
    assert os.environ["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:9092"
    assert os.environ["BYZGUARD_ENV_FILE"] == ""


def test_a_dotenv_file_changes_no_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A .env in the working directory is read neither by this process's settings nor by a command it starts."""
    from app.settings import Settings

    (tmp_path / ".env").write_text("BYZGUARD_BROKER=from-dotenv:9092\nBYZGUARD_APP_ID=dotenv\n")
    monkeypatch.chdir(tmp_path)
    assert (Settings().broker, Settings().app_id) == (None, "byzguard")
    probe = "from app.settings import Settings; s = Settings(); print(s.broker, s.app_id)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.split() == ["None", "byzguard"]


def test_a_test_still_sets_its_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BYZGUARD_* variable a test sets itself reaches the settings."""
    from app.settings import Settings

    monkeypatch.setenv("BYZGUARD_APP_ID", "mine")
    assert Settings().app_id == "mine"
