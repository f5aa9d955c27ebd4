"""Microseconds per call of byzguard's JCS against the rfc8785 package, on a ~400-byte price event.

Run: .venv/bin/python bench/jcs_speed.py
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

import orjson
import rfc8785

from byzguard.jcs import canonicalize, canonicalize_json

PRICE_EVENT = {
    "sku": "SKU-0012345",
    "currency": "EUR",
    "price": 129.99,
    "previous_price": 119.5,
    "list_price": 149.0,  # integral: JCS writes 149, orjson 149.0
    "discount_rate": 0.15,
    "vat_rate": 0.2,
    "qty_available": 37,
    "updated_at_ms": 1718000000123,
    "active": True,
    "note": None,
    "tiers": [
        {"min_qty": 1, "unit_price": 129.99},
        {"min_qty": 10, "unit_price": 119.99},
        {"min_qty": 100, "unit_price": 109.0},
    ],
    "tags": ["summer", "sale", "electronics"],
    "warehouse": {"id": "wh-07", "region": "eu-west-1", "lat": 53.3498, "lon": -6.2603},
}
RAW = orjson.dumps(PRICE_EVENT)


def per_call_us(fn: Callable[[], object], number: int) -> float:
    """Best of several runs, in microseconds per call; the minimum is the least disturbed by other load."""
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def main() -> None:
    """Check the two agree, then print us/op for each."""
    assert canonicalize(PRICE_EVENT) == rfc8785.dumps(PRICE_EVENT)
    print(f"object: {len(RAW)} bytes as orjson text, {len(canonicalize(PRICE_EVENT))} bytes canonical")
    rows = [
        ("byzguard.jcs.canonicalize", per_call_us(lambda: canonicalize(PRICE_EVENT), 20_000)),
        ("byzguard.jcs.canonicalize_json", per_call_us(lambda: canonicalize_json(RAW), 20_000)),
        ("rfc8785.dumps", per_call_us(lambda: rfc8785.dumps(PRICE_EVENT), 2_000)),
        ("orjson.dumps(OPT_SORT_KEYS), not JCS", per_call_us(
            lambda: orjson.dumps(PRICE_EVENT, option=orjson.OPT_SORT_KEYS), 20_000)),
    ]
    for name, us in rows:
        print(f"{name:40s} {us:8.2f} us/op")
    print(f"speed-up over rfc8785: {rows[2][1] / rows[0][1]:.1f}x")


if __name__ == "__main__":
    main()
