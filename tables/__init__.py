"""Table declarations: per-entity state, per-source Lamport marks and the causal buffer, RocksDB-backed
with changelogs, co-partitioned with the route's inputs (record key = entity id).

One combined record per entity (see byzguard.state.EntityState): each table write is a changelog message.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust

from byzguard.config import Route


@dataclass(frozen=True)
class RouteTables:
    """The faust tables of one route; the causal buffer exists only where the route holds early events."""

    state_by_entity: faust.TableT[bytes, bytes]
    lamport_by_source: faust.TableT[bytes, bytes]
    causal_by_entity: faust.TableT[bytes, bytes] | None = None


def table_names(route: Route) -> list[str]:
    """The names of a route's tables (their changelog topics are `<app_id>-<name>-changelog`)."""
    names = [f"{route.name}-state_by_entity", f"{route.name}-lamport_by_source"]
    if route.causal.buffer:
        names.append(f"{route.name}-causal_by_entity")
    return names


def declare_route_tables(app: faust.App, route: Route) -> RouteTables:
    """Declare a route's tables on `app`."""
    # key_type/value_type bytes make faust use the raw codec for the store and the changelog: the core
    # serializes its own records, once.
    tables = [app.Table(name, key_type=bytes, value_type=bytes, partitions=route.partitions)
              for name in table_names(route)]
    return RouteTables(*tables)
