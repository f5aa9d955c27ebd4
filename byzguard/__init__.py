"""byzguard: decode, verify and stamp inter-service events.

The public surface for services around the worker (`pip install byzguard[client]`):

- stamping: `Stamper` (no Kafka client), `GuardedProducer` (aiokafka; `send_confirmed` waits for the verdict),
  `Key` and the algorithms `SHA256`, `XXH3_128`, `HMAC_SHA256`;
- verify again downstream: `verify_again`, `verify_record` with a `KeyRing`;
- last-known-good values: `get_last_known_good`, `aget_last_known_good` (fail closed: `NoVerifiedValue`,
  `LastKnownGoodUnavailable`);
- contracts: `load_contract(...).check(records)`; in a producer's pytest suite the `byzguard_contract` fixture
  (the plugin is registered on install) and `byzguard.contract.assert_passes`.

Names load lazily, so `import byzguard` costs nothing and the pure core (every module but `byzguard.client`)
imports neither faust, mode nor aiokafka.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from byzguard.client.lkg import (
        LastKnownGood,
        LastKnownGoodError,
        LastKnownGoodUnavailable,
        NoVerifiedValue,
        aget_last_known_good,
        get_last_known_good,
    )
    from byzguard.client.producer import GuardedProducer, Receipt, ReceiptsTopicMissing, ReceiptTimeout
    from byzguard.contract import ContractReport, load_contract
    from byzguard.integrity import HMAC_SHA256, SHA256, XXH3_128, Key, KeyRing
    from byzguard.stamp import Stamped, Stamper
    from byzguard.verdict import Code
    from byzguard.verify_again import Reverified, verify_again, verify_record

__version__ = "0.1.0"

__all__ = [
    "HMAC_SHA256",
    "SHA256",
    "XXH3_128",
    "Code",
    "ContractReport",
    "GuardedProducer",
    "Key",
    "KeyRing",
    "LastKnownGood",
    "LastKnownGoodError",
    "LastKnownGoodUnavailable",
    "NoVerifiedValue",
    "Receipt",
    "ReceiptTimeout",
    "ReceiptsTopicMissing",
    "Reverified",
    "Stamped",
    "Stamper",
    "aget_last_known_good",
    "get_last_known_good",
    "load_contract",
    "verify_again",
    "verify_record",
]

_HOME = {
    "GuardedProducer": "client.producer", "Receipt": "client.producer", "ReceiptTimeout": "client.producer",
    "ReceiptsTopicMissing": "client.producer",
    "LastKnownGood": "client.lkg", "LastKnownGoodError": "client.lkg", "LastKnownGoodUnavailable": "client.lkg",
    "NoVerifiedValue": "client.lkg", "get_last_known_good": "client.lkg", "aget_last_known_good": "client.lkg",
    "ContractReport": "contract", "load_contract": "contract",
    "HMAC_SHA256": "integrity", "SHA256": "integrity", "XXH3_128": "integrity", "Key": "integrity",
    "KeyRing": "integrity",
    "Stamped": "stamp", "Stamper": "stamp",
    "Code": "verdict",
    "Reverified": "verify_again", "verify_again": "verify_again", "verify_record": "verify_again",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
