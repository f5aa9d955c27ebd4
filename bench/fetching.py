"""How the faust pass-through's consumer fetches (variant b, bench/passthrough_faust.py): the two fetch settings
faust hard-codes, made settings, so that b fetches as byzguard's batched runtime does (BYZGUARD_FETCH_MIN_BYTES,
BYZGUARD_FETCH_MAX_WAIT_MS). Until the faust agent runtime was removed this was the worker's own (app/fetching.py);
the text below is what was measured then.

faust creates its aiokafka consumer with `fetch_max_wait_ms=1500` (and aiokafka's `fetch_min_bytes=1`).
aiokafka sends one fetch at a time per broker, and leaves out of it every partition whose fetched records the
application has not read yet. The worker's consumer also holds partitions that carry no traffic (faust's
`__assignor-__leader` topic). So when the agent is still busy with the last fetch of every input partition, the
next fetch asks for the idle partitions only, and the broker holds it for the full wait: the input partitions
cannot be fetched again until it returns. Under a steady load this feeds itself: 1.5 s of events arrive at once,
the agent is busy with them again when the next fetch goes out, and the next one is held again. The latency
benchmark caught a worker in that state: 1.0 to 1.8 s for every event, in a sawtooth of 1.5 s, for the rest of
the run (bench/results/profile.md, "Latency").

`fetch_max_wait_ms` (BYZGUARD_FETCH_MAX_WAIT_MS, default 10) bounds that delay; an idle worker then polls the
broker that often. It has a price under saturation: the fetch of the idle partitions comes back empty every
10 ms, and a saturated worker (and faust's own pass-through) then did about a fifth fewer events per second
than with 1500 ms (bench/results/fetch-wait-4499522). A deployment that cares for throughput more than for
latency sets it higher. Pausing the leader partition in aiokafka, so that it is never fetched, was measured side
by side with c and dropped: it gave faust's own pass-through about a tenth more events/s, but byzguard fewer
in each of three interleaved repetitions, and the same latency (bench/results/fetch-ab-e8a772f). `fetch_min_bytes`
lets the broker gather more per fetch, at the price of that wait; 64 KiB did not lower the latency either (same
run).
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread


def tune_fetch(app: faust.App, *, min_bytes: int, max_wait_ms: int) -> None:
    """Make the app's consumer fetch with `min_bytes` and `max_wait_ms`. Call before the app starts."""
    if app._consumer is not None:
        raise RuntimeError("bench.fetching.tune_fetch must run before the app's consumer is created")
    transport: Any = app.transport
    base_consumer = transport.Consumer

    class ConsumerThread(AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            # Read by AIOKafkaConsumer.start() when it builds its fetcher (aiokafka 0.14, pinned).
            consumer._fetch_min_bytes = min_bytes
            consumer._fetch_max_wait_ms = max_wait_ms
            return consumer

    class Consumer(base_consumer):  # type: ignore[valid-type,misc]
        def _new_consumer_thread(self) -> Any:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    transport.Consumer = Consumer
