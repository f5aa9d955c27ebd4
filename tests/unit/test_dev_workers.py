"""app/dev/workers.py: a worker as a child process (command line, environment, readiness, stop, kill, log)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from app.dev.workers import (
    READY_LINE,
    WorkerFailedError,
    WorkerProcess,
    child_env,
    tail_lines,
    web_base,
    worker_argv,
)


def test_worker_argv_runs_the_cli_with_this_interpreter() -> None:
    """The default command line is `python -m app.cli run` with this interpreter, extra arguments appended."""
    assert worker_argv() == [sys.executable, "-m", "app.cli", "run"]
    assert worker_argv("--no-demo") == [sys.executable, "-m", "app.cli", "run", "--no-demo"]


def test_worker_argv_puts_a_wrapper_module_in_front() -> None:
    """A wrapper module and its arguments run the CLI module as their own argument."""
    assert worker_argv(wrapper=["bench.gctrace", "x"]) == [sys.executable, "-m", "bench.gctrace", "x", "app.cli",
                                                           "run"]


def test_child_env_drops_the_developers_settings_and_adds_the_overrides() -> None:
    """Variables with a dropped prefix do not reach the child; the overrides do, and win."""
    base = {"PATH": "/bin", "BYZGUARD_BROKER": "mine:9092", "KAFKA_X": "1", "HOME": "/h"}
    env = child_env({"BYZGUARD_APP_ID": "t", "HOME": "/t"}, drop=("BYZGUARD_", "KAFKA_"), base=base)
    assert env == {"PATH": "/bin", "HOME": "/t", "BYZGUARD_APP_ID": "t"}


def test_child_env_without_prefixes_keeps_everything() -> None:
    """An empty `drop` keeps the whole base environment."""
    assert child_env({}, drop=(), base={"BYZGUARD_A": "1"}) == {"BYZGUARD_A": "1"}


def test_web_base_reaches_a_wildcard_address_on_loopback() -> None:
    """A worker listening on every address is reached at 127.0.0.1; a named host as it is."""
    assert web_base("0.0.0.0", 6066) == "http://127.0.0.1:6066"
    assert web_base("", 1) == "http://127.0.0.1:1"
    assert web_base("example", 8) == "http://example:8"


def test_tail_lines_keeps_the_last_lines() -> None:
    """The tail is the last n lines; zero lines is empty."""
    assert tail_lines("a\nb\nc\n", 2) == "b\nc"
    assert tail_lines("a\nb", 0) == ""


def _python(tmp_path: Path, code: str, **kwargs: Any) -> WorkerProcess:
    return WorkerProcess("w", dict(os.environ), tmp_path / "logs" / "w.log",
                         argv=[sys.executable, "-u", "-c", code], **kwargs)


SLEEPER = f"print({READY_LINE!r}); import time; time.sleep(60)"


def test_a_worker_is_ready_once_it_logs_the_ready_line(tmp_path: Path) -> None:
    """wait_ready returns once this run of the worker has logged the ready line."""
    worker = _python(tmp_path, SLEEPER, data_dir=tmp_path / "data").start()
    try:
        assert worker.wait_ready(timeout=20) >= 0
        assert (tmp_path / "data").is_dir()
    finally:
        worker.kill()
    assert not worker.alive()


def test_a_ready_line_of_an_earlier_run_does_not_count(tmp_path: Path) -> None:
    """A log appended to by several runs: only what this run wrote makes it ready."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "w.log").write_text(f"{READY_LINE}\n")
    worker = _python(tmp_path, "import time; time.sleep(60)").start()
    try:
        with pytest.raises(WorkerFailedError, match="not ready within 1 s"):
            worker.wait_ready(timeout=1)
    finally:
        worker.kill()


def test_a_worker_that_exits_before_ready_fails_with_its_log(tmp_path: Path) -> None:
    """Exiting before the ready line fails with the exit code and the tail of the log."""
    worker = _python(tmp_path, "print('configuration refused'); raise SystemExit(2)").start()
    with pytest.raises(WorkerFailedError, match=r"exited with code 2(.|\n)*configuration refused"):
        worker.wait_ready(timeout=20)


def test_stop_sends_sigterm_and_returns_the_exit_code(tmp_path: Path) -> None:
    """stop() sends SIGTERM and returns the code the worker exits with."""
    code = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
            f"print({READY_LINE!r})\ntime.sleep(60)")
    worker = _python(tmp_path, code).start()
    worker.wait_ready(timeout=20)
    assert worker.stop(timeout=20) == 0


def test_a_worker_that_ignores_sigterm_is_killed_and_must_stop_fails(tmp_path: Path) -> None:
    """A worker still running after the timeout is SIGKILLed; with must_stop that is an error."""
    code = (f"import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint({READY_LINE!r})\n"
            "time.sleep(60)")
    worker = _python(tmp_path, code).start()
    worker.wait_ready(timeout=20)
    assert worker.stop(timeout=0.5) == -signal.SIGKILL
    again = _python(tmp_path, code).start()
    again.wait_ready(timeout=20)
    with pytest.raises(WorkerFailedError, match="did not stop within 0 s of SIGTERM"):
        again.stop(timeout=0.2, must_stop=True)
    assert not again.alive()


def test_kill_reaches_the_whole_process_group(tmp_path: Path) -> None:
    """A worker in its own session is killed with its children (a wrapper's, for instance)."""
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"print(child.pid, flush=True)\nprint({READY_LINE!r})\ntime.sleep(60)")
    worker = _python(tmp_path, code).start()
    worker.wait_ready(timeout=20)
    grandchild = int(worker.run_log().split()[0])
    worker.kill()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and "Z" not in _state(grandchild):
        assert time.monotonic() < deadline, "the worker's child survived the kill"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "Z"


def test_the_banner_and_the_log_of_this_run(tmp_path: Path) -> None:
    """With a banner each start is marked in the log; run_log and log_tail hold this run's lines only."""
    worker = _python(tmp_path, "print('first run')", banner=True).start()
    assert worker.proc is not None and worker.proc.wait(20) == 0
    worker.argv = [sys.executable, "-c", "print('second run')"]
    worker.start()
    assert worker.proc is not None and worker.proc.wait(20) == 0
    assert worker.log_text().count("===== w starting at") == 2
    assert worker.run_log() == "second run\n" and worker.log_tail(5) == "second run"


def test_a_worker_whose_log_level_hides_the_ready_line_is_ready_by_its_lag_gauge(tmp_path: Path) -> None:
    """With its web address known, a worker is also ready once /metrics show an assigned partition's lag."""
    import http.server
    import threading

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            body = b'byzguard_consumer_lag_messages{topic="in",partition="0"} 0.0\n'
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    worker = _python(tmp_path, "import time; time.sleep(60)", web=web_base("0.0.0.0", server.server_port)).start()
    try:
        assert worker.wait_ready(timeout=20) >= 0
        assert READY_LINE not in worker.run_log()
    finally:
        worker.kill()
        server.shutdown()
