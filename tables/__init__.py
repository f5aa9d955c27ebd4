"""The guard's tables: per-entity state, per-source Lamport marks and the causal buffer, each a RocksDB database per
partition with a compacted changelog, co-partitioned with the route's inputs (record key = entity id).

Their layout is faust's (the batched runtime reads and writes it, app/runtime/state.py): a route's table
partition is the database `<tabledir>/<route>-<table>-<partition>.db`, its changelog the topic
`<app_id>-<route>-<table>-changelog`. So a data dir and changelogs written by earlier releases (the faust agent
runtime) are read as they are. One combined record per entity (see byzguard.state.EntityState): each table write
is a changelog message.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from byzguard.config import Route
from byzguard.guard import CAUSAL, ENTITIES, LAMPORTS


class Table(StrEnum):
    """A table of a route; its full name is `<route>-<table>` (`table_name`)."""

    STATE_BY_ENTITY = "state_by_entity"
    LAMPORT_BY_SOURCE = "lamport_by_source"
    #: Only where the route holds early events (`causal.buffer`).
    CAUSAL_BY_ENTITY = "causal_by_entity"


#: The table each of the guard's state names (byzguard.guard) lives in.
TABLE_OF: Mapping[str, Table] = {ENTITIES: Table.STATE_BY_ENTITY, LAMPORTS: Table.LAMPORT_BY_SOURCE,
                                 CAUSAL: Table.CAUSAL_BY_ENTITY}


def route_tables(route: Route) -> list[Table]:
    """The tables a route keeps (the causal buffer only where the route holds early events)."""
    return [Table.STATE_BY_ENTITY, Table.LAMPORT_BY_SOURCE, *([Table.CAUSAL_BY_ENTITY] if route.causal.buffer else [])]


def table_name(route: Route, table: Table) -> str:
    """The full name of one of a route's tables (its database files and changelog topic are named after it)."""
    return f"{route.name}-{table.value}"


def table_names(route: Route) -> list[str]:
    """The names of a route's tables (their changelog topics are `<app_id>-<name>-changelog`)."""
    return [table_name(route, table) for table in route_tables(route)]


def store_options(*, write_buffer_mb: int, block_cache_mb: int) -> dict[str, Any]:
    """RocksDB options of one table (a database is opened with them per partition).

    Four memtables: all databases of a process share one flush thread, and a database whose memtables are all
    full stops writes until one is flushed, blocking the event loop. With two of 4 MB, a restore of 900,000
    entities slowed faust's consumer thread (keepalive missed for 3 s) and the worker then stopped making
    progress with 47 records left; the cause of that hang is not established (bench memory run, 2026-11-30).
    """
    return {"write_buffer_size": write_buffer_mb << 20, "max_write_buffer_number": 4,
            "block_cache_size": block_cache_mb << 20}
