"""Table declarations: per-entity state and per-source Lamport marks, RocksDB-backed with changelogs.

One combined record per entity (see byzguard.state.EntityState): each table write is a changelog message.
Tables are co-partitioned with the route's inputs (record key = entity id).
"""

from __future__ import annotations

from dataclasses import dataclass

import faust

from byzguard.config import Route


@dataclass(frozen=True)
class RouteTables:
    """The faust tables of one route."""

    state_by_entity: faust.TableT[bytes, bytes]
    lamport_by_source: faust.TableT[bytes, bytes]


def declare_route_tables(app: faust.App, route: Route) -> RouteTables:
    """Declare a route's tables on `app`."""
    # key_type/value_type bytes make faust use the raw codec for the store and the changelog: the core
    # serializes its own records, once.
    return RouteTables(
        state_by_entity=app.Table(f"{route.name}-state_by_entity", key_type=bytes, value_type=bytes,
                                  partitions=route.partitions),
        lamport_by_source=app.Table(f"{route.name}-lamport_by_source", key_type=bytes, value_type=bytes,
                                    partitions=route.partitions),
    )
