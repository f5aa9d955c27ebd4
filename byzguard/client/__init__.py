"""byzguard's client side, for the services around the worker (install `byzguard[client]`).

- `producer`: GuardedProducer, stamped sends with aiokafka (and `send_confirmed`, the guard's verdict).
- `lkg`: last-known-good values from any worker's HTTP view (stdlib; the asyncio variant uses aiohttp).

The only part of the `byzguard` package that imports a Kafka or HTTP client; the core never imports it.
"""
