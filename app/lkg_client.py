"""Moved to byzguard.client.lkg (installed with byzguard); this name stays for the worker's code."""

from byzguard.client.lkg import (
    LastKnownGood,
    LastKnownGoodError,
    LastKnownGoodUnavailable,
    NoVerifiedValue,
    aget_last_known_good,
    get_last_known_good,
    parse_response,
    url_for,
)

__all__ = ["LastKnownGood", "LastKnownGoodError", "LastKnownGoodUnavailable", "NoVerifiedValue",
           "aget_last_known_good", "get_last_known_good", "parse_response", "url_for"]
