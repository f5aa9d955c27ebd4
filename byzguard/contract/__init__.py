"""Contract tests for producers: does every event my code emits pass byzguard's route R?

- `check`: run a sample through a route's checks in order (`load_contract(...).check(records)`).
- `diff_contracts`: what a new configuration would newly reject or warn about on the same sample.
- `sample`: read records from Python objects or JSON lines.
- `pytest_plugin`: the `byzguard_contract` fixture and `assert_passes` for a producer's own tests.

Names are imported lazily: `import byzguard.contract.pytest_plugin` (loaded by every pytest run of an
environment where byzguard is installed) must not pay for the configuration and rule machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .check import Contract, ContractError, ContractReport, Finding, Snapshot, contract_from_text, load_contract
    from .diff import Change, ContractDiff, diff_contracts
    from .pytest_plugin import ContractFailure, assert_passes

__all__ = [
    "Change",
    "Contract",
    "ContractDiff",
    "ContractError",
    "ContractFailure",
    "ContractReport",
    "Finding",
    "Snapshot",
    "assert_passes",
    "contract_from_text",
    "diff_contracts",
    "load_contract",
]

_HOME = {
    "Contract": "check", "ContractError": "check", "ContractReport": "check", "Finding": "check",
    "Snapshot": "check", "contract_from_text": "check", "load_contract": "check",
    "Change": "diff", "ContractDiff": "diff", "diff_contracts": "diff",
    "ContractFailure": "pytest_plugin", "assert_passes": "pytest_plugin",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
