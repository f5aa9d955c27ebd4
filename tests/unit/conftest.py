"""Shared builders for the core's unit tests: a configuration, a stamper and a guard over dict state."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from byzguard import config as guard_config
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS, Guard, RecordIn, Result, Routed
from byzguard.integrity import Key

SECRET_ENV = {"KEY_PRICING": "pricing-secret", "KEY_ORDERS": "orders-secret"}
PRICING_KEY = Key("pricing-1", "pricing", b"pricing-secret")
ORDERS_KEY = Key("orders-1", "orders", b"orders-secret")

BASE_CONFIG = """
defaults:
  max_skew: 5s
  max_age: 24h
keys:
  pricing-1: {source: pricing, secret_env: KEY_PRICING}
  orders-1: {source: orders, secret_env: KEY_ORDERS}
routes:
  - name: main
    inputs: [in]
    verified_topic: out
    quarantine_topic: bad
    default_type: price.updated
    types:
      price.updated:
        sources: [pricing, orders]
        rules:
          - {name: price_positive, expr: "data.price > 0"}
          - name: price_jump
            expr: >-
              last == null || (data.price - last.price) / last.price < 0.5
              && (last.price - data.price) / last.price < 0.5
            severity: warn
      signed.thing:
        sources: [pricing]
        key_ids: [pricing-1]
"""


def make_config(text: str = BASE_CONFIG) -> guard_config.GuardConfig:
    """Compile configuration text with the test secrets in the environment."""
    return guard_config.loads(textwrap.dedent(text), environ=SECRET_ENV)


class Harness:
    """A guard over in-memory state that applies its own writes, as the agent does with tables."""

    def __init__(self, text: str = BASE_CONFIG) -> None:
        self.config = make_config(text)
        self.guard = Guard(self.config)
        self.route = self.config.routes[0]
        self.state: dict[str, dict[bytes, bytes]] = {ENTITIES: {}, LAMPORTS: {}, CAUSAL: {}}
        self.offset = 0
        self.last: Result = Result()

    @property
    def entities(self) -> dict[bytes, bytes]:
        """The entity table."""
        return self.state[ENTITIES]

    def apply(self, result: Result) -> Result:
        """Apply a result's state writes, as the agent does with its tables."""
        for (table, key), value in result.writes.items():
            if value is None:
                self.state[table].pop(key, None)
            else:
                self.state[table][key] = value
        self.last = result
        return result

    def feed_all(self, key: bytes | None, value: bytes | None, headers: Any = (), *, now: float) -> Result:
        """Process one record; the result holds it and any held records it released."""
        self.offset += 1
        record = RecordIn(key, value, list(headers), "in", 0, self.offset, now)
        return self.apply(self.guard.process(record, self.route, self.state, now=now))

    def feed(self, key: bytes | None, value: bytes | None, headers: Any = (), *, now: float) -> Routed:
        """Process one record and return its own routing."""
        return self.feed_all(key, value, headers, now=now).first

    def tick(self, *, now: float) -> Result:
        """Expire held records past the deadline."""
        return self.apply(self.guard.expire_held(self.route, self.state, now=now))


@pytest.fixture
def harness_factory() -> Callable[..., Harness]:
    """Build a fresh harness from configuration text."""
    return Harness


@pytest.fixture
def harness() -> Harness:
    """A harness over the base configuration."""
    return Harness()
