"""pytest plugin: "every event my code emits passes byzguard's route R", in a producer's own tests.

Installed with byzguard (entry point `pytest11: byzguard_contract`), so any test can use the fixture:

    def test_price_events_pass_byzguard(byzguard_contract):
        records = [stamper.binary(e, type="price.updated", subject=e["sku"], version=v) for ...]
        byzguard_contract("byzguard.yaml", route="prices", secrets={"pricing-1": "test-secret"}).check(records)

or, without the fixture, `from byzguard.contract import assert_passes` and
`assert_passes(records, "byzguard.yaml", route="prices")`. A failure lists each event that would be
quarantined, with its codes and details. `[tool.pytest.ini_options] byzguard_config = "..."` and
`byzguard_route = "..."` set the defaults.

This module is imported by every pytest run of an environment where byzguard is installed: it imports
nothing beyond pytest at import time, and its hooks only declare two ini options.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from byzguard.contract.check import Clock, Contract, ContractReport, Finding, Snapshot

__all__ = ["ContractFailure", "ProducerContract", "assert_passes", "byzguard_contract"]

DEFAULT_CONFIG = "byzguard.yaml"


class ContractFailure(AssertionError):
    """Some events of the sample would not pass the route; `report` has every finding."""

    def __init__(self, message: str, report: ContractReport) -> None:
        super().__init__(message)
        self.report = report


def failure_message(report: ContractReport, failing: Iterable[Finding]) -> str:
    """A readable account: how many events fail, then each with its codes and details, then the totals."""
    failing = list(failing)
    lines = [f"{len(failing)} of {report.total} event(s) would not pass byzguard route {report.route!r} "
             f"({report.config_path}):"]
    for finding in failing:
        lines.append("  " + finding.describe().replace("\n", "\n  "))
    lines.append(report.summary())
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)


class ProducerContract:
    """A route's contract, with a `check` that fails the test when any event would not pass."""

    def __init__(self, contract: Contract) -> None:
        self.contract = contract

    @property
    def route(self) -> str:
        """The route's name."""
        return self.contract.route.name

    def report(self, records: Iterable[object], *, snapshot: Snapshot | None = None, now: Clock = None,
               key_field: str | None = None) -> ContractReport:
        """What byzguard would do with `records`, without failing."""
        return self.contract.check(records, snapshot=snapshot, now=now, key_field=key_field)

    def check(self, records: Iterable[object], *, allow_warnings: bool = True, allow_duplicates: bool = True,
              snapshot: Snapshot | None = None, now: Clock = None, key_field: str | None = None) -> ContractReport:
        """Fail (ContractFailure, an AssertionError) when any event would be rejected; return the report.

        `allow_warnings=False` also fails on warned events, `allow_duplicates=False` on duplicates.
        """
        __tracebackhide__ = True
        report = self.report(records, snapshot=snapshot, now=now, key_field=key_field)
        failing = [f for f in report.findings
                   if f.rejected or (not allow_warnings and f.outcome.value == "warned")
                   or (not allow_duplicates and f.outcome.value == "duplicate")]
        if failing:
            raise ContractFailure(failure_message(report, failing), report)
        return report

    # `contract.passes(records)` reads well in a plain assert too.
    def passes(self, records: Iterable[object], **options: Any) -> bool:
        """True when no event would be rejected."""
        return self.report(records, **options).passed


def _resolve(config: str | os.PathLike[str], bases: Iterable[Path]) -> Path:
    path = Path(config)
    if path.is_absolute() or path.exists():
        return path
    for base in bases:
        candidate = base / path
        if candidate.exists():
            return candidate
    return path  # load_contract then says it cannot read it


def _load(config: str | os.PathLike[str], route: str | None, secrets: Mapping[str, str | bytes] | None,
          environ: Mapping[str, str] | None, bases: Iterable[Path], cache: dict[Any, Any] | None) -> ProducerContract:
    __tracebackhide__ = True
    from byzguard.contract.check import load_contract

    path = _resolve(config, bases)
    key = None
    if cache is not None and environ is None:
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            stamp = None
        key = (str(path.resolve()), stamp, route, tuple(sorted((secrets or {}).items())))
        if key in cache:
            cached: ProducerContract = cache[key]
            return cached
    loaded = ProducerContract(load_contract(path, route, secrets=secrets, environ=environ))
    if cache is not None and key is not None:
        cache[key] = loaded
    return loaded


def assert_passes(
    records: Iterable[object],
    config: str | os.PathLike[str] = DEFAULT_CONFIG,
    route: str | None = None,
    *,
    secrets: Mapping[str, str | bytes] | None = None,
    allow_warnings: bool = True,
    allow_duplicates: bool = True,
    snapshot: Snapshot | None = None,
    now: Clock = None,
    key_field: str | None = None,
) -> ContractReport:
    """Assert that every record would pass `route` of `config`; the failure lists each failing event."""
    __tracebackhide__ = True
    contract = _load(config, route, secrets, None, [Path.cwd()], None)
    return contract.check(records, allow_warnings=allow_warnings, allow_duplicates=allow_duplicates,
                          snapshot=snapshot, now=now, key_field=key_field)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare the defaults of the `byzguard_contract` fixture as ini options."""
    parser.addini("byzguard_config", f"byzguard routes file for byzguard_contract (default {DEFAULT_CONFIG})",
                  default=None)
    parser.addini("byzguard_route", "default route for byzguard_contract", default=None)


@pytest.fixture(scope="session")
def _byzguard_contract_cache() -> dict[Any, Any]:
    """Compiled contracts, shared by the session's tests (rules compile once per file and route)."""
    return {}


@pytest.fixture
def byzguard_contract(
    request: pytest.FixtureRequest, _byzguard_contract_cache: dict[Any, Any]
) -> Callable[..., ProducerContract]:
    """`byzguard_contract(config=None, *, route=None, secrets=None, environ=None)` -> a ProducerContract.

    `config` defaults to the `byzguard_config` ini option, then `byzguard.yaml`; a relative path is
    looked up from the working directory, the rootdir, then the test file's folder. `route` is a route
    name or one of its input topics (default: the `byzguard_route` ini option, or the only route).
    `secrets` maps MAC key ids to test secrets.
    """
    ini_config = request.config.getini("byzguard_config") or None
    ini_route = request.config.getini("byzguard_route") or None
    bases = [Path.cwd(), Path(request.config.rootpath), Path(request.path).parent]

    def load(config: str | os.PathLike[str] | None = None, *, route: str | None = None,
             secrets: Mapping[str, str | bytes] | None = None,
             environ: Mapping[str, str] | None = None) -> ProducerContract:
        __tracebackhide__ = True
        return _load(config or ini_config or DEFAULT_CONFIG, route or ini_route, secrets, environ, bases,
                     _byzguard_contract_cache)

    return load
