"""Moved to byzguard.client.producer (installed by `byzguard[client]`); this name stays for the worker's code."""

from byzguard.client.producer import GuardedProducer, Receipt, ReceiptsTopicMissing, ReceiptTimeout

__all__ = ["GuardedProducer", "Receipt", "ReceiptTimeout", "ReceiptsTopicMissing"]
