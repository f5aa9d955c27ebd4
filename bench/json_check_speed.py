"""Microseconds per event that the repeated-key check (decode.ambiguous) and the parse of binary data declared
JSON add to decoding, on the benchmark's clean price events (a structured event is about 490 bytes).

Each figure compares decode with the check switched off and on, alternately in one process, and keeps the best
of many repeats (the machine is shared: medians move a lot, minima little).

Run: PYTHONPATH=. .venv/bin/python bench/json_check_speed.py
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable
from typing import Any

import orjson

import byzguard.envelope as envelope
from bench.events import events

REAL = (envelope.unambiguous, envelope._is_json)


def _switch(on: bool, *, parse: bool) -> None:
    if on:
        envelope.unambiguous, envelope._is_json = REAL
    else:
        envelope.unambiguous = lambda *args: None
        if parse:
            envelope._is_json = lambda content_type: False


def _per_event(run: Callable[[], None], count: int) -> float:
    return min(timeit.repeat(run, number=3, repeat=25)) / 3 / count * 1e6


def _compare(label: str, stamped: list[Any], *, parse: bool, read_data: bool) -> None:
    def run() -> None:
        for s in stamped:
            env = envelope.decode(s.key, s.value, s.headers, default_type="price.updated")
            if read_data:
                env.data()  # type: ignore[union-attr]
    off, on = [], []
    for _ in range(5):
        _switch(False, parse=parse)
        off.append(_per_event(run, len(stamped)))
        _switch(True, parse=parse)
        on.append(_per_event(run, len(stamped)))
    print(f"{label:58s} {min(off):6.2f} -> {min(on):6.2f} us/event  (+{min(on) - min(off):.2f})")


def main() -> None:
    structured = list(events(100, 50, at=1.8e9, mode="structured"))
    binary = list(events(100, 50, at=1.8e9, mode="binary"))
    size = sum(len(s.value) for s in structured) / len(structured)
    print(f"decode, check off -> on (structured value {size:.0f} B)")
    _compare("structured: repeated-key check", structured, parse=False, read_data=False)
    _compare("binary, a type with rules (data is parsed either way)", binary, parse=True, read_data=True)
    _compare("binary, a type without rules (declared JSON now parsed)", binary, parse=True, read_data=False)
    value = structured[0].value
    parsed = orjson.loads(value)
    spaced = json.dumps(parsed).encode()
    spaced_parsed = orjson.loads(spaced)
    calls = {
        "orjson.loads (for scale)": lambda: orjson.loads(value),
        "unambiguous, compact JSON (re-serialization equal)": lambda: envelope.unambiguous(value, parsed, "v"),
        "unambiguous, spaced JSON (colon count)": lambda: envelope.unambiguous(spaced, spaced_parsed, "v"),
        "json.loads + object_pairs_hook (the exact fallback)":
            lambda: json.loads(value, object_pairs_hook=envelope._refuse_duplicates),
    }
    for label, call in calls.items():
        print(f"{label:58s} {min(timeit.repeat(call, number=20000, repeat=7)) / 20000 * 1e6:6.2f} us")


if __name__ == "__main__":
    main()
