"""How long invariant rules take per event: the compiled fast path against celpy's tree walk.

Run with `python bench/rules_speed.py` from the repository root. For each of the seed article's four rules,
and for all four together, it times RuleSet.evaluate on a valid price event (with a last-known-good), so
the per-event preparation of the variables is included, and prints µs per evaluation: the fastest of
several timeit repeats. By default it counts the process's CPU time, not wall-clock time, so that other
work on a busy machine (which deschedules this process) does not inflate the figures; --wall counts
wall-clock time instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
import timeit
from collections.abc import Callable
from typing import Any

from byzguard.rules import RuleSet, RuleSpec, compile_rules
from byzguard.rules.ruleset import _celpy_only
from byzguard.verdict import Severity

NOW = 1_750_000_000.0
EVENT: dict[str, Any] = {"id": "e-1", "source": "pricing-service", "type": "price.updated",
                         "subject": "p-1", "time": NOW - 1.0, "version": 7}
SEED_RULES = (
    RuleSpec("price_positive", "data.price > 0", Severity.REJECT),
    RuleSpec("currency_iso", 'data.currency.matches("^[A-Z]{3}$")', Severity.REJECT),
    RuleSpec("price_change", "last == null || abs(data.price - last.price) / last.price < 0.5", Severity.WARN),
    RuleSpec("fresh", 'now - timestamp(data.lastUpdated) < duration("24h")', Severity.REJECT),
)


def price(value: float, age_s: float = 3600.0) -> dict[str, Any]:
    """A valid price event's data, as the seed's producers write it."""
    updated = dt.datetime.fromtimestamp(NOW - age_s, dt.UTC).isoformat().replace("+00:00", "Z")
    return {"productId": "p-1", "price": value, "currency": "USD", "lastUpdated": updated}


def per_call_us(call: Callable[[], object], budget_s: float, repeat: int, clock: Callable[[], float]) -> float:
    """The fastest of `repeat` timings of `call`, in µs per call, each timing lasting about `budget_s`."""
    timer = timeit.Timer(call, timer=clock)
    number, _ = timer.autorange()
    number = max(1, int(number * budget_s / 0.2))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    """Print the table of µs per evaluation, fast path against celpy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--budget", type=float, default=0.2, help="seconds per timing (default 0.2)")
    parser.add_argument("--repeat", type=int, default=5, help="timings per figure, the fastest kept (default 5)")
    parser.add_argument("--wall", action="store_true", help="count wall-clock time rather than CPU time")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.process_time

    data, last = price(49.99), price(49.5)
    cases: list[tuple[str, RuleSet]] = [(spec.name, compile_rules([spec])) for spec in SEED_RULES]
    cases.append(("all four (per event)", compile_rules(SEED_RULES)))

    print(f"µs per evaluation ({'wall-clock' if args.wall else 'CPU'} time), fastest of {args.repeat} timings")
    print(f"{'rule':24} {'fast µs':>9} {'celpy µs':>10} {'speed-up':>9}")
    for name, rules in cases:
        assert rules.compiled_fast == rules.names, f"{name} is not on the fast path"
        reference = _celpy_only(rules)
        fast_reasons = rules.evaluate(data, last, now=NOW, event=EVENT)
        assert fast_reasons == reference.evaluate(data, last, now=NOW, event=EVENT) == []

        def fast(rules: RuleSet = rules) -> object:
            return rules.evaluate(data, last, now=NOW, event=EVENT)

        def slow(rules: RuleSet = reference) -> object:
            return rules.evaluate(data, last, now=NOW, event=EVENT)

        fast_us = per_call_us(fast, args.budget, args.repeat, clock)
        slow_us = per_call_us(slow, args.budget, args.repeat, clock)
        print(f"{name:24} {fast_us:9.2f} {slow_us:10.1f} {slow_us / fast_us:8.0f}x")


if __name__ == "__main__":
    main()
