"""The worker's log during a broker outage: the first record of each kind, a count of the rest, one recovery line."""

from __future__ import annotations

import logging

from app.logs import QuietRepeats


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_an_outage_logs_once_then_counts_then_says_it_recovered() -> None:
    """5,000 connection errors over 27 s pass as one line; after 10 s of silence one line says they stopped."""
    clock = Clock()
    quiet = QuietRepeats(window=60.0, quiet_after=10.0, clock=clock)
    passed = 0
    for n in range(5000):
        clock.now = 1000.0 + n * 27 / 5000
        passed += quiet.filter(record("aiokafka.conn", 'Unable connect to "%s:%s": %s', "127.0.0.1", 9092 + n % 3,
                                      "refused"))
    assert passed == 1
    clock.now += 5
    assert quiet.sweep() == [], "5 s of silence is not yet a recovery"
    clock.now += 6
    (line,) = quiet.sweep()
    assert line.startswith("recovered: no more ERROR from aiokafka.conn like 'Unable connect to \"127.0.0.1:9092\"")
    assert "5000 times over 27 s (4999 not logged)" in line
    assert quiet.sweep() == [] and quiet.kinds == {}
    assert quiet.filter(record("aiokafka.conn", 'Unable connect to "%s:%s": %s', "h", 1, "again")), \
        "after a recovery the next failure is logged at once"


def test_a_long_outage_logs_once_per_window_with_how_many_were_left_out() -> None:
    """A condition that goes on is logged again once per window, saying how many records were not logged."""
    clock = Clock()
    quiet = QuietRepeats(window=60.0, clock=clock)
    shown = []
    for n in range(121):
        clock.now = 1000.0 + n
        rec = record("faust.transport.consumer", "Fetch failed: %r", n)
        if quiet.filter(rec):
            shown.append(rec.getMessage())
    assert len(shown) == 3
    assert shown[1] == "Fetch failed: 60 [59 more like this in the last 60 s were not logged]"


def test_own_records_info_and_distinct_messages_always_pass() -> None:
    """byzguard's own records, INFO records and different messages are never dropped."""
    quiet = QuietRepeats(clock=Clock())
    assert all(quiet.filter(record("app.outbox", "send failed")) for _ in range(10))
    assert all(quiet.filter(record("aiokafka.conn", "connected", level=logging.INFO)) for _ in range(10))
    assert quiet.filter(record("aiokafka.conn", "one thing")) and quiet.filter(record("aiokafka.conn", "another"))
    assert not quiet.filter(record("aiokafka.conn", "one thing"))


def test_attached_to_a_handler_it_filters_what_is_written(caplog: object) -> None:
    """attach() filters the handlers of a logger: repeats written through them are dropped."""
    import io

    stream = io.StringIO()
    logger = logging.getLogger("test-logs-attach")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        QuietRepeats(clock=Clock()).attach(logger)
        noisy = logging.getLogger("aiokafka.client")
        noisy.propagate = False
        noisy.addHandler(handler)
        for _ in range(50):
            noisy.error("Unable to update metadata from [%d]", 1)
        noisy.removeHandler(handler)
        noisy.propagate = True
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().count("Unable to update metadata") == 1
