"""Worker processes of the benchmark and what /proc says about them (CPU time, RSS, machine load)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.dev.workers import WorkerProcess, child_env

REPO = Path(__file__).resolve().parent.parent
# Where worker processes import byzguard from: the checkout, or a snapshot of it (bench.run --snapshot), so that
# edits made while a long run goes on do not change what the later runs measure.
SOURCE = [REPO]
CRASH_MARKERS = (b"Crashed reason=", b"We experienced a crash")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a live process."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except OSError:
        return None


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return (total - idle) / _TICKS, total / _TICKS


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


class Worker(WorkerProcess):
    """A worker subprocess (byzguard, a pass-through) with its log file, in a process group of its own
    (app/dev/workers.py), and its RSS samples."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        super().__init__(name, env, log_path, argv=argv, cwd=cwd)
        self.peak_rss = 0
        self.samples: list[tuple[float, int]] = []
        self._log_offset = 0

    @classmethod
    def python(cls, name: str, args: Sequence[str], *, env: Mapping[str, str], cwd: Path,
               log_path: Path) -> Worker:
        """A `python -m ...` worker run with this interpreter, the repository first on sys.path."""
        full_env = child_env({"PYTHONPATH": str(SOURCE[0]), "PYTHONUNBUFFERED": "1", **env})
        return cls(name, [sys.executable, *args], full_env, cwd, log_path)

    def sample(self) -> int | None:
        """Record the current RSS (and keep the peak)."""
        rss = rss_bytes(self.pid) if self.alive() else None
        if rss is not None:
            self.peak_rss = max(self.peak_rss, rss)
            self.samples.append((time.monotonic() - self.started_at, rss))
        return rss

    def cpu(self) -> float | None:
        return cpu_seconds(self.pid) if self.alive() else None

    def check(self) -> None:
        """Raise with the log tail if the worker has exited, or logged that an agent crashed (faust then
        often hangs in its shutdown instead of exiting)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited with code {self.proc.returncode}; log "
                               f"{self.log_path}:\n{self.tail()}")
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                new = log.read()
        except OSError:
            return
        # Keep a little overlap so a marker split across two reads is still found.
        self._log_offset += max(0, len(new) - 64)
        for marker in CRASH_MARKERS:
            if marker in new:
                raise RuntimeError(f"worker {self.name} crashed ({marker.decode()}); log {self.log_path}:\n"
                                   f"{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return self.log_tail(lines)

    def stop(self, timeout: float = 20.0, *, must_stop: bool = False) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        return super().stop(timeout, must_stop=must_stop)
