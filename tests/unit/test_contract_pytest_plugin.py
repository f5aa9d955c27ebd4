"""The pytest plugin, as a producer service uses it: in a throwaway project of its own, run by pytester."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

CONFIG = """
keys:
  pricing-1: {source: pricing, secret_env: PRODUCER_TEST_KEY}
routes:
  - name: prices
    inputs: [prices]
    verified_topic: prices.verified
    quarantine_topic: prices.quarantine
    require_checksum: true
    types:
      price.updated:
        sources: [pricing]
        key_ids: [pricing-1]
        rules:
          - {name: price_positive, expr: "data.price > 0"}
  - name: orders
    inputs: [orders]
    verified_topic: orders.verified
    quarantine_topic: orders.quarantine
    types: {order.confirmed: {}}
"""

PRODUCER_TESTS = '''
from byzguard.contract import assert_passes
from byzguard.integrity import HMAC_SHA256, Key
from byzguard.stamp import Stamper


def emitted(unknown_price):
    """What the producer's code emits: a known product, then what it says about an unknown one."""
    stamper = Stamper("pricing", algorithm=HMAC_SHA256, key=Key("pricing-1", "pricing", b"s3cret"))
    return [
        stamper.binary({"sku": "sku-1", "price": 49.99}, type="price.updated", subject="sku-1", version=1),
        stamper.binary({"sku": "sku-404", "price": unknown_price}, type="price.updated", subject="sku-404",
                       version=1),
    ]


def test_events_pass(byzguard_contract):
    report = byzguard_contract("contracts/byzguard.yaml", route="prices", secrets={"pricing-1": "s3cret"}
                               ).check(emitted(unknown_price=12.5))
    assert report.total == 2 and report.passed


def test_unknown_product_priced_zero(byzguard_contract):
    byzguard_contract(secrets={"pricing-1": "s3cret"}).check(emitted(unknown_price=0))


def test_assert_passes_helper():
    assert_passes(emitted(unknown_price=0), "contracts/byzguard.yaml", route="prices",
                  secrets={"pricing-1": "s3cret"})
'''


def _plugin_args() -> list[str]:
    # The entry point loads the plugin; only when autoloading is off must it be named. The producer's
    # project has no async tests, so pytest-asyncio (installed here) is kept out of its runs.
    named = ["-p", "byzguard.contract.pytest_plugin"] if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else []
    return [*named, "-p", "no:asyncio"]


@pytest.fixture
def producer_project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A producer service's repository: the guard's config it was handed, and its own tests."""
    pytester.mkdir("contracts")
    (pytester.path / "contracts" / "byzguard.yaml").write_text(textwrap.dedent(CONFIG))
    pytester.makeini("""
        [pytest]
        byzguard_config = contracts/byzguard.yaml
        byzguard_route = prices
    """)
    pytester.makepyfile(test_producer=PRODUCER_TESTS)
    return pytester


def test_plugin_passes_good_events_and_fails_bad_ones_readably(producer_project: pytest.Pytester) -> None:
    """A producer's passing sample passes; a failing one fails, listing the event with its code and detail."""
    # -rN: no short summary, whose length depends on the CI variable; each failure is then shown once.
    result = producer_project.runpytest(*_plugin_args(), "-rN")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        "*test_unknown_product_priced_zero*",
        "*1 of 2 event(s) would not pass byzguard route 'prices' (*contracts/byzguard.yaml):",
        "*#1 key='sku-404' type=price.updated source=pricing id=* -> quarantined",
        "*invariant.violated (invariant, reject): rule 'price_positive' failed: data.price > 0 (data.price=0)",
        "*FAIL: route 'prices': 2 event(s): 1 verified, 1 quarantined; codes: invariant.violated x1",
    ])
    output = result.stdout.str()
    assert "def _load" not in output and "def check" not in output  # the plugin's own frames are hidden
    assert output.count("invariant.violated (invariant, reject)") == 2  # the fixture and assert_passes


def test_plugin_stays_out_of_the_way_of_other_test_runs(pytester: pytest.Pytester) -> None:
    """A project that never uses the plugin runs as before, and importing the plugin loads no config machinery."""
    pytester.makepyfile(test_other="def test_nothing():\n    assert True\n")
    result = pytester.runpytest_subprocess(*_plugin_args())
    result.assert_outcomes(passed=1)
    probe = pytester.run(
        sys.executable, "-c",
        "import sys, byzguard.contract.pytest_plugin as p; "
        "print(p.__name__, any(m in sys.modules for m in ('byzguard.config', 'celpy', 'yaml', 'pydantic')))",
    )
    probe.stdout.fnmatch_lines(["byzguard.contract.pytest_plugin False"])
