"""The byzguard exception tree, drawn in one place.

ByzguardError                       root of everything byzguard raises
├── ConfigError                     configuration refused at start (the operator's fault; fix and restart)
│   ├── RuleCompileError            an invariant rule that does not compile
│   ├── KeyRingError                a MAC key cannot be loaded (missing env var or file)
│   └── ContractError               (contract.check) a contract that cannot be built from the config
├── ClockError                      a clock value out of bounds or unparsable (event's fault)
├── CanonicalizationError           (jcs) a value RFC 8785 cannot represent: NaN, big ints, lone surrogates
├── ReviewError                     (review) a review request refused
│   ├── NotAuthenticatedError       no or wrong token: 401, nothing written
│   └── BadFilterError              a quarantine filter that does not parse
└── InfrastructureError             broker or store trouble: retriable, let Kafka redeliver

Defined beside the code that raises them (named in parentheses), all under this root.

Failed checks are never raised: they are returned as `Reason`s inside a verdict (see verdict.py).
`retriable` says whether trying again can help, as aiokafka's `KafkaError.retriable` does.
"""

from __future__ import annotations


class ByzguardError(Exception):
    """Root of byzguard's exceptions."""

    retriable: bool = False


class ConfigError(ByzguardError):
    """The configuration is invalid; the message names the file, the field path and what is wrong."""


class RuleCompileError(ConfigError):
    """An invariant rule failed to compile; `loc` is its path in the configuration file, when known."""

    loc: tuple[int | str, ...] = ()


class KeyRingError(ConfigError):
    """A configured MAC key could not be loaded from its file or environment variable."""


class ClockError(ByzguardError, ValueError):
    """A Lamport or vector clock value is malformed or exceeds its bound."""


class InfrastructureError(ByzguardError):
    """Broker or state store trouble; the record is not at fault and will be redelivered."""

    retriable = True
