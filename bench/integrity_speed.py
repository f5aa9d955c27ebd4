"""What binding the attributes costs per event: Guard.process on the bench's HMAC events in the bound form
against the same events in the value-only form (their source declared to use it, its warning turned off so
both take the same path), no broker.

Run with `python bench/integrity_speed.py [--mode binary|structured] [--events N]` from the repository root.
It prints µs per event for each form, the fastest of several passes over fresh state, and the difference.
By default it counts the process's CPU time, so that other work on a busy machine does not inflate the
figures; --wall counts wall-clock time instead.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from bench.events import KEY_ID, SECRET, SOURCE, events, secret_env, write_config
from byzguard import config as guard_config
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, Guard, RecordIn
from byzguard.integrity import BOUND, HMAC_SHA256, VALUE_ONLY, Key
from byzguard.stamp import Stamper

REPO = Path(__file__).resolve().parents[1]
AT = 1_800_000_000.0


def per_event_us(guard: Guard, records: list[RecordIn], passes: int, clock: Callable[[], float]) -> float:
    """The fastest pass over `records` (each from empty state), in µs per event; every event must pass."""
    route = guard.config.routes[0]
    best = float("inf")
    for _ in range(passes):
        state: dict[str, dict[bytes, bytes]] = {ENTITIES: {}, LAMPORTS: {}, CAUSAL: {}}
        start = clock()
        for record in records:
            result = guard.process(record, route, state, now=AT)
            for (table, key), value in result.writes.items():
                if value is not None:
                    state[table][key] = value
        best = min(best, clock() - start)
        assert result.first.decision.forward, result.first.decision
    return best / len(records) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=("binary", "structured"), default="binary")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--wall", action="store_true", help="count wall-clock time, not CPU time")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.process_time
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(Path(tmp) / "bench.yaml", repo=REPO, input_topic="in", verified="out",
                            quarantine="bad", partitions=1)
        text = yaml.safe_load(path.read_text())
        text["sources"] = {SOURCE: {"forms": [VALUE_ONLY]}}
        # Off here so that both forms take the same path (verified, no reason to write): only integrity differs.
        text["defaults"]["codes"]["integrity.legacy_form"] = "off"
        path.write_text(yaml.safe_dump(text, sort_keys=False))
        guard = Guard(guard_config.load(path, environ=secret_env()))
    records = {}
    for form in (VALUE_ONLY, BOUND):
        stamper = Stamper(SOURCE, algorithm=HMAC_SHA256, key=Key(KEY_ID, SOURCE, SECRET.encode()), form=form)
        records[form] = [RecordIn(s.key, s.value, s.headers, "in", 0, i, AT)
                         for i, s in enumerate(events(args.events, 2_000, at=AT, mode=args.mode, stamp=stamper))]
    results = {form: float("inf") for form in records}
    for _ in range(args.passes):  # interleaved, so that a slow phase of a busy machine hits both forms
        for form, recs in records.items():
            results[form] = min(results[form], per_event_us(guard, recs, 1, clock))
    for form, us in results.items():
        print(f"{args.mode} {form:>10}: {us:6.2f} µs/event")
    print(f"bound - value-only: {results[BOUND] - results[VALUE_ONLY]:+.2f} µs/event "
          f"({(results[BOUND] / results[VALUE_ONLY] - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
