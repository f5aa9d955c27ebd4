"""app/dev/localkafka.py, without a broker (the integration tests start one): stopping is over only when the
process is gone and its data dir is free again."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.dev.localkafka import (
    BOOTSTRAP_FILE,
    INFO_FILE,
    PID_FILE,
    STOP_SECONDS_PER_PARTITION,
    STOP_TIMEOUT,
    LocalKafkaError,
    _data_dir_locked,
    _terminate_pid,
    ensure_running,
    running_broker,
    stop_running,
    stop_timeout,
)

IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)
HOLDS_LOCK = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(float(sys.argv[2]))"
)


# A process whose command line says kafka.Kafka, as the pid checks want of a broker: it stands in for the broker's
# process only (its pid and its data dir in the run files), not for Kafka.
LOOKS_LIKE_BROKER = "import sys, time; print('ready', flush=True); time.sleep(60)"


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() in ("ready", "locked")
    return proc


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait(5)


def test_terminate_waits_for_the_data_dir_lock_after_sigkill(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    """A broker that ignores SIGTERM is killed, and the stop returns only once its data dir's lock is free."""
    broker = _child(IGNORES_SIGTERM)
    holder = _child(HOLDS_LOCK, str(tmp_path / ".lock"), "2.0")  # the JVM's threads still tearing down
    children += [broker, holder]
    started = time.monotonic()
    _terminate_pid(broker.pid, 0.3, data_dir=tmp_path, kill_wait=20)
    assert broker.poll() is not None
    assert not _data_dir_locked(tmp_path)
    assert time.monotonic() - started >= 1.0


def test_terminate_says_so_when_the_data_dir_stays_locked(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    """A data dir still locked long after the SIGKILL is a clear error instead of a later failed start."""
    broker = _child(IGNORES_SIGTERM)
    children += [broker, _child(HOLDS_LOCK, str(tmp_path / ".lock"), "60")]
    with pytest.raises(LocalKafkaError, match=r"still holds .*\.lock"):
        _terminate_pid(broker.pid, 0.2, data_dir=tmp_path, kill_wait=0.5)


def test_stop_timeout_grows_with_the_partitions_of_the_data_dir(tmp_path: Path) -> None:
    """A broker with many partitions gets the time its controlled shutdown needs before a SIGKILL."""
    assert stop_timeout(tmp_path) == STOP_TIMEOUT
    for i in range(500):
        (tmp_path / f"topic-{i}").mkdir()
    assert stop_timeout(tmp_path) == pytest.approx(STOP_TIMEOUT + 500 * STOP_SECONDS_PER_PARTITION)
    assert stop_timeout(None) == STOP_TIMEOUT


def test_a_second_data_dir_under_the_same_parent_neither_reuses_nor_stops_the_first(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    """Run files live in the data dir's parent: /tmp/a-kafka and /tmp/b-kafka share them. Starting b must not
    reuse a's broker and stopping b must not stop it; both say which broker holds the run files."""
    first = _child(LOOKS_LIKE_BROKER, "kafka.Kafka")
    children.append(first)
    (tmp_path / PID_FILE).write_text(f"{first.pid}\n")
    (tmp_path / BOOTSTRAP_FILE).write_text("127.0.0.1:1\n")
    (tmp_path / INFO_FILE).write_text(json.dumps({"pid": first.pid, "data_dir": str(tmp_path / "a-kafka")}))
    other = tmp_path / "b-kafka"
    with pytest.raises(LocalKafkaError, match=r"another broker .*a-kafka.* parent of its own"):
        ensure_running(data_dir=other, timeout=1)
    with pytest.raises(LocalKafkaError, match=r"another broker .*a-kafka"):
        stop_running(other, timeout=1)
    assert running_broker(other, timeout=0.1) is None
    assert first.poll() is None  # still running
    assert (tmp_path / PID_FILE).exists()
