"""faust's producer, told the topics it may refresh, so its metadata requests never ask for the whole cluster.

An aiokafka client that knows no topic refreshes the metadata of every topic of the cluster. faust's producer
sends nothing of byzguard's (the batched runtime has its own producers), so its client knows none, and faust
forces a refresh after each topic it declares (its leader topic, at start and again when the conductor
subscribes): two requests for every partition of the cluster, whose answers the worker parses on its event loop
(about 1 MB at 16,000 partitions). Told the routes' input topics (they exist: provisioning made them), the same
refreshes ask for those topics alone. Nothing else changes: faust still declares its leader topic, and a send
adds its topic to the client as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faust


def scope_producer_metadata(app: faust.App, topics: Sequence[str]) -> None:
    """Make *app*'s producer refresh the metadata of *topics* (which must exist) instead of every topic's.

    Call it before the producer exists (``app.producer`` creates it): it replaces the producer transport's
    Producer class, as faust's own drivers define it.
    """
    known = tuple(topics)
    if not known:
        return
    transport: Any = app.transport  # faust builds its producer with the consumer transport's Producer class

    class TopicScopedProducer(transport.Producer):  # type: ignore[misc]
        """faust's aiokafka Producer whose client refreshes the given topics only."""

        async def on_start(self) -> None:
            await super().on_start()
            self._ensure_producer().client.set_topics(known)

    transport.Producer = TopicScopedProducer


__all__ = ["scope_producer_metadata"]
