"""What the verify stream records of each routed record besides its outputs: the metrics (docs/operations.md).

What is counted is app/runtime/tally.py's `Tally`; `observe` counts one record at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from byzguard.guard import Routed


def observe(route: str, routed: Routed, now: float) -> None:
    """Count one routed record in the metrics at once (the loop counts a batch's in its Tally, app/runtime/tally.py;
    this is for a record routed outside a batch's count, such as a forward stage's stub)."""
    # Imported here: app.runtime's package imports the loop, whose stages import this module (importing
    # agents.verify first failed with a circular import).
    from app.runtime.tally import Tally

    tally = Tally()
    tally.routed(route, routed, now)
    tally.flush()
