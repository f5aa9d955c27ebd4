"""The last event time decode parsed, for the rules to reuse: a producer commonly writes the event's `time`
and a timestamp in its data (`lastUpdated`) as the same text, and the freshness rule would parse it again.

One entry, replaced by every structured event decode reads on its fast path: (the text as sent, what
`datetime.fromisoformat` made of it, that datetime's `.timestamp()`). Only texts fromisoformat reads as an
aware datetime are kept, so the entry holds exactly what a reader calling those two functions would get;
the rules take it only for a text equal to the kept one, and in the branch where they call fromisoformat.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

#: [(text, datetime.fromisoformat(text), its .timestamp())]; a list so that readers bind it once.
LAST: Final[list[tuple[str, datetime, float]]] = [("", datetime(1970, 1, 1, tzinfo=UTC), 0.0)]
