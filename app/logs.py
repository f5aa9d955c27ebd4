"""A log that says what is wrong once, says when it recovered, and is not flooded.

When the broker goes away, aiokafka and faust log the same warning or error for every connection attempt, fetch
and metadata refresh: a 27-second outage wrote about 5,000 ERROR lines. `QuietRepeats`, a filter on the root
handlers, lets the first record of each kind through (kind: logger, level and message template, digits ignored),
drops its repeats, lets one through per `window` seconds with how many were left out, and once a kind has been
silent for `quiet_after` seconds `sweep()` returns one line saying it stopped, when, and how often it came.
Only WARNING and above of the noisy libraries' loggers are filtered; byzguard's own records always pass.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NOISY = ("aiokafka", "faust", "mode", "kafka")
WINDOW = 60.0
QUIET_AFTER = 10.0
MAX_KINDS = 1_000  # kinds tracked at once; beyond it records pass unfiltered (never an unbounded table)
_DIGITS = re.compile(r"\d+")

log = logging.getLogger("byzguard.logs")


@dataclass
class _Kind:
    sample: str
    first: float
    last: float
    shown: float
    count: int = 1
    left_out: int = 0  # since the last record shown
    left_out_total: int = 0


class QuietRepeats(logging.Filter):
    """Rate-limits repeated WARNING+ records of the noisy loggers; `sweep()` reports the kinds that stopped."""

    def __init__(self, *, prefixes: tuple[str, ...] = NOISY, window: float = WINDOW, quiet_after: float = QUIET_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.window = window
        self.quiet_after = quiet_after
        self.clock = clock
        self.kinds: dict[tuple[str, int, str], _Kind] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether the record is written (the first of its kind, or the first after `window` seconds)."""
        if record.levelno < logging.WARNING or not record.name.startswith(self.prefixes):
            return True
        key = (record.name, record.levelno, _DIGITS.sub("#", str(record.msg))[:300])
        now = self.clock()
        kind = self.kinds.get(key)
        if kind is None:
            if len(self.kinds) < MAX_KINDS:
                self.kinds[key] = _Kind(_sample(record), now, now, now)
            return True
        kind.last = now
        kind.count += 1
        if now - kind.shown < self.window:
            kind.left_out += 1
            kind.left_out_total += 1
            return False
        if kind.left_out:
            note = f" [{kind.left_out} more like this in the last {now - kind.shown:.0f} s were not logged]"
            record.msg = f"{record.msg}{note.replace('%', '%%') if record.args else note}"
        kind.shown, kind.left_out = now, 0
        return True

    def sweep(self) -> list[str]:
        """Forget the kinds silent for `quiet_after` seconds; one line for each that repeated, saying it stopped."""
        now = self.clock()
        lines = []
        for key, kind in list(self.kinds.items()):
            if now - kind.last < self.quiet_after:
                continue
            del self.kinds[key]
            if kind.count > 1:
                ended = time.strftime("%H:%M:%S", time.localtime(time.time() - (now - kind.last)))
                lines.append(f"recovered: no more {logging.getLevelName(key[1])} from {key[0]} like {kind.sample!r} "
                             f"since {ended}; it came {kind.count} times over {kind.last - kind.first:.0f} s "
                             f"({kind.left_out_total} not logged)")
        return lines

    def attach(self, logger: logging.Logger | None = None) -> None:
        """Filter every handler of `logger` (the root logger by default)."""
        for handler in (logger or logging.getLogger()).handlers:
            if self not in handler.filters:
                handler.addFilter(self)


def _sample(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception:  # a record whose arguments do not format: its template says enough
        text = str(record.msg)
    return text.splitlines()[0][:200] if text else ""


def install(app: Any, quiet: QuietRepeats, *, interval: float = 1.0) -> None:
    """Sweep `quiet` on a timer of `app` and log each recovery once."""

    @app.timer(interval=interval)  # type: ignore[untyped-decorator]  # faust's App.timer is untyped
    async def report_recoveries() -> None:
        for line in quiet.sweep():
            log.info("%s", line)
