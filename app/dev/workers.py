"""A worker as a child process, for the demo, the integration tests and the benchmark (development only).

`WorkerProcess` starts `python -m app.cli run` (or any `python -m MODULE ...` command line) with a given
environment, working directory and data dir, its output appended to a log file; waits until it is ready; stops it
cleanly (SIGTERM, then SIGKILL after a timeout) or kills it (SIGKILL); and shows the tail of this run's log when
it fails.

Ready means: the worker logged READY_LINE after this start. faust's Worker logs it once the partitions are
assigned and the tables recovered; the batched runtime delays it until it owns its partitions (restored).
/healthz is no such signal: the web server answers it before any partition is assigned. Where the log level hides
INFO lines, a worker whose web address is known is also ready once its /metrics show the consumer lag of an
assigned partition.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "READY_LINE",
    "WorkerFailedError",
    "WorkerProcess",
    "child_env",
    "http_get",
    "tail_lines",
    "web_base",
    "worker_argv",
]

READY_LINE = "[^Worker]: Ready"  # faust's Worker, once partitions are assigned and tables recovered
LAG_SAMPLE = b"byzguard_consumer_lag_messages{"  # a labelled sample: some input partition is assigned


class WorkerFailedError(RuntimeError):
    """A worker did not become ready or did not stop as its caller needed; the message ends with its log."""


def worker_argv(*args: str, module: str = "app.cli", wrapper: Sequence[str] = ()) -> list[str]:
    """The command line of a worker run by this interpreter: `python -m app.cli run ARGS` (the `byzguard run`
    console script, with the working tree first on sys.path); `wrapper`, a module and its arguments, runs it as
    `python -m WRAPPER... app.cli run ARGS`."""
    return [sys.executable, "-m", *wrapper, module, "run", *args]


def child_env(overrides: Mapping[str, str], *, drop: Iterable[str] = ("BYZGUARD_",),
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: `base` (this process's by default) without the variables starting with one of
    the `drop` prefixes, so that the developer's own settings cannot change a run, plus `overrides`."""
    prefixes = tuple(drop)
    env = {k: v for k, v in (os.environ if base is None else base).items() if not (prefixes and k.startswith(prefixes))}
    env.update(overrides)
    return env


def web_base(host: str, port: int) -> str:
    """The URL base of a worker's web server, as a client on this machine reaches it."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def http_get(url: str, timeout: float = 2.0) -> bytes | None:
    """The body of a GET, or None when nothing answers (connection refused, timeout, HTTP error)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except (urllib.error.URLError, OSError, ValueError):
        return None


def tail_lines(text: str, lines: int) -> str:
    """The last `lines` lines of `text`."""
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


class WorkerProcess:
    """One worker child process with its environment, working directory, data dir and log file.

    `new_session`: the child leads a process group of its own, and signals go to that whole group (a wrapper's
    children included); without it the child shares the terminal's group (Ctrl-C reaches it too) and signals
    go to the child alone. `banner`: write a line naming the worker and the time into the log before each start,
    for logs that several runs append to."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path, *, argv: Sequence[str] | None = None,
                 cwd: Path | None = None, data_dir: Path | None = None, web: str | None = None,
                 new_session: bool = True, banner: bool = False) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = log_path
        self.argv = list(argv) if argv is not None else worker_argv()
        self.cwd = cwd
        self.data_dir = data_dir
        self.web = web
        self.new_session = new_session
        self.banner = banner
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._log_start = 0  # where this run's part of the (appended) log begins

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> WorkerProcess:
        """Spawn the process; its stdout and stderr append to the log file."""
        for folder in (self.cwd, self.data_dir, self.log_path.parent):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            if self.banner:
                log.write(f"\n===== {self.name} starting at {time.time():.3f} =====\n".encode())
                log.flush()
            self._log_start = log.tell()
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=self.new_session)
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has exited (negative: the signal that ended it), else None."""
        return self.proc.poll() if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        """Send `sig` to the running worker (to its process group when it has its own session)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.new_session:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Block until the worker is ready (module docstring); the seconds since its start. WorkerFailedError
        (`fail`) with its log when it exits first or takes longer than `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self.run_log():
                return time.monotonic() - self.started_at
            if not self.alive():
                raise self.fail(f"the worker exited with code {self.returncode}")
            if self.web is not None:
                body = http_get(f"{self.web}/metrics", timeout=1.0)
                if body is not None and LAG_SAMPLE in body:
                    return time.monotonic() - self.started_at
            time.sleep(0.1)
        raise self.fail(f"the worker was not ready within {timeout:.0f} s")

    def stop(self, timeout: float = 30.0, *, must_stop: bool = False) -> int | None:
        """SIGTERM and wait for the exit; a worker still running after `timeout` seconds is killed (and, with
        `must_stop`, that fails). Its exit code (None when it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.send(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                if must_stop:
                    raise self.fail(f"did not stop within {timeout:.0f} s of SIGTERM") from None
        return self.proc.returncode

    def kill(self, wait: float = 30.0) -> None:
        """SIGKILL (no shutdown code runs) and reap."""
        if self.proc is None:
            return
        self.send(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(wait)

    # ------------------------------------------------------------------ the log

    def log_text(self) -> str:
        """The whole log file (every run appended to it)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def run_log(self) -> str:
        """What this run of the worker has logged so far."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last lines this run of the worker logged."""
        return tail_lines(self.run_log(), lines)

    def fail(self, what: str) -> Exception:
        """The error to raise when the worker did not do `what` its caller needed: with the tail of its log."""
        return WorkerFailedError(f"{what}; its log ({self.log_path}):\n{self.log_tail()}")
