"""Table declarations: per-entity state, per-source Lamport marks and the causal buffer, RocksDB-backed
with changelogs, co-partitioned with the route's inputs (record key = entity id).

One combined record per entity (see byzguard.state.EntityState): each table write is a changelog message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust
from faust.types import TableT

from byzguard.config import Route


@dataclass(frozen=True)
class RouteTables:
    """The faust tables of one route; the causal buffer exists only where the route holds early events."""

    state_by_entity: TableT[bytes, bytes]
    lamport_by_source: TableT[bytes, bytes]
    causal_by_entity: TableT[bytes, bytes] | None = None


def table_names(route: Route) -> list[str]:
    """The names of a route's tables (their changelog topics are `<app_id>-<name>-changelog`)."""
    names = [f"{route.name}-state_by_entity", f"{route.name}-lamport_by_source"]
    if route.causal.buffer:
        names.append(f"{route.name}-causal_by_entity")
    return names


def store_options(*, write_buffer_mb: int, block_cache_mb: int) -> dict[str, Any]:
    """RocksDB options of one table (faust opens a database with them per partition).

    Four memtables: all databases of a process share one flush thread, and a database whose memtables are all
    full stops writes until one is flushed, blocking the event loop. With two of 4 MB, a restore of 900,000
    entities slowed faust's consumer thread (keepalive missed for 3 s) and the worker then stopped making
    progress with 47 records left; the cause of that hang is not established (bench memory run, 2026-11-30).
    """
    return {"write_buffer_size": write_buffer_mb << 20, "max_write_buffer_number": 4,
            "block_cache_size": block_cache_mb << 20}


def declare_table(app: faust.App, name: str, partitions: int, options: dict[str, Any]) -> TableT[bytes, bytes]:
    """One byzguard table on `app`: raw bytes keys and values, RocksDB `options` (see store_options)."""
    # key_type/value_type bytes make faust use the raw codec for the store and the changelog: the core
    # serializes its own records, once. Each table gets its own copy of the options: faust's store pops
    # keys from the dict it is given.
    return app.Table(name, key_type=bytes, value_type=bytes, partitions=partitions, options=dict(options))


def declare_route_tables(app: faust.App, route: Route, options: dict[str, Any]) -> RouteTables:
    """Declare a route's tables on `app` with the RocksDB `options` (see store_options)."""
    return RouteTables(*(declare_table(app, name, route.partitions, options) for name in table_names(route)))
