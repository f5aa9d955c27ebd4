"""bench/scenarios.py without a broker: the state records the memory phase restores."""

from __future__ import annotations

import time

from bench.scenarios import entity_states, state_record_sizes
from byzguard.state import EntityState


def test_restored_records_hold_the_ids_asked_for_and_the_guards_record_size() -> None:
    """--memory-ids 32: each restored record decodes with 32 distinct recent ids (versions 1..32) and is the size
    of the record the guard writes after 32 events (within a few bytes: the last-known-good value's digits differ)."""
    at = time.time()
    one = list(entity_states(3, at=at, mode="structured", prefix="t"))
    full = list(entity_states(3, at=at, mode="structured", prefix="t", ids=32))
    assert [k for k, _, _ in one] == [k for k, _, _ in full]
    sizes = state_record_sizes("structured")
    for (_, small, _), (_, big, _) in zip(one, full, strict=True):
        state = EntityState.from_bytes(big)
        assert state.version == 32
        assert [seen.version for seen in state.recent] == list(range(1, 33))
        assert len({seen.id_hash for seen in state.recent}) == 32
        assert EntityState.from_bytes(small).recent and len(EntityState.from_bytes(small).recent) == 1
        assert abs(len(small) - sizes[1]) <= 4
        assert abs(len(big) - sizes[32]) <= 4
    # Ids of different entities differ (RocksDB would otherwise compress the history away).
    assert EntityState.from_bytes(full[0][1]).recent[0].id_hash != EntityState.from_bytes(full[1][1]).recent[0].id_hash
    # More than the record keeps: the record keeps 32.
    assert len(EntityState.from_bytes(next(entity_states(1, at=at, mode="structured", prefix="t", ids=40))[1])
               .recent) == 32
