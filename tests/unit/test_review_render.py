"""Every quarantined record can be shown, whatever its bytes: bounded JSON, escaped markup, no raw control codes."""

from __future__ import annotations

import io
from typing import Any

import orjson
from rich.console import Console

import app.cli_quarantine as cli_quarantine
from byzguard.review import (
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_TEXT,
    ReviewItem,
    ReviewLedger,
    Status,
    Tally,
    bounded,
    entity_view,
    item_detail,
    item_summary,
    parse_quarantined,
)
from byzguard.routing import quarantine_headers
from byzguard.state import EntityState
from byzguard.verdict import Code, Outcome, Reason

HOSTILE = "\x1b[2J\x1b]0;owned\x07\x9b31m\u202e[/x][bold]"  # clear screen, window title, C1 CSI, bidi, markup


def nested(depth: int) -> Any:
    """A JSON value `depth` objects deep."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def nested_bytes(depth: int) -> bytes:
    """The JSON text of nested(depth) (orjson writes at most 254 levels)."""
    return b'{"a":' * depth + b"1" + b"}" * depth


def hostile_item(depth: int = 300) -> ReviewItem:
    """A quarantined record whose attributes carry markup and escape sequences and whose data nests `depth` deep."""
    headers = [("ce_specversion", b"1.0"), ("ce_id", HOSTILE.encode()), ("ce_source", b"[/x]"),
               ("ce_type", HOSTILE.encode()), ("ce_subject", HOSTILE.encode()), ("content-type", b"application/json")]
    hdrs = quarantine_headers(headers, Outcome.QUARANTINED, [Reason(Code.DECODE_MALFORMED, HOSTILE)], "prices",
                              topic="prices", partition=0, offset=5, timestamp=1.0, now=2.0)
    record = parse_quarantined(HOSTILE.encode(), nested_bytes(depth), hdrs, topic="q", partition=0, offset=9,
                               timestamp=2.0)
    assert record is not None
    return ReviewLedger().review_item(record)


def rendered(render: Any, *args: Any) -> str:
    """What a CLI renderer writes to a 80-column terminal that understands colours."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, color_system="standard")
    saved = cli_quarantine.out
    cli_quarantine.out = console
    try:
        render(*args)
    finally:
        cli_quarantine.out = saved
    return buffer.getvalue()


def without_styles(text: str) -> str:
    """The text with rich's own SGR colour sequences taken out (those are the only escapes allowed)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_bounded_cuts_depth_width_and_length_and_says_so() -> None:
    """Deeper levels, longer containers and longer strings are cut with a marker; small values pass unchanged."""
    assert bounded({"a": [1, "x", None]}) == {"a": [1, "x", None]}
    deep = bounded(nested(1000))
    assert orjson.dumps(deep)  # orjson refuses more than 254 levels: the cut value serializes
    inner = deep
    for _ in range(MAX_DEPTH):
        inner = inner["a"]
    assert isinstance(inner, str) and "nested deeper" in inner
    assert len(bounded(list(range(MAX_ITEMS + 50)))) == MAX_ITEMS + 1
    assert bounded("y" * (MAX_TEXT + 10)).endswith("(10 more characters)")
    wide = bounded([[list(range(150)) for _ in range(150)] for _ in range(5)])  # 112,500 numbers
    assert "too large to show whole" in orjson.dumps(wide).decode()


def test_detail_of_a_300_deep_record_serializes() -> None:
    """The detail of a record nested 300 levels deep is JSON that orjson (and so the API) can write."""
    detail = item_detail(hostile_item(300))
    assert orjson.dumps(detail)
    assert detail["source"] == "[/x]" and detail["data"]["decoded"]


def test_entity_view_of_a_1000_deep_last_good_value_serializes() -> None:
    """A last-known-good value nested 1,000 levels deep is shown cut, not an error."""
    value = nested_bytes(1000)
    state = EntityState(version=1, vclock=None, content_hash=b"", last_good=value, last_good_type="t",
                        verified_at=1.0, event_time=None)
    view = entity_view(state.to_bytes())
    assert view is not None and orjson.dumps(view)


def test_show_prints_markup_and_escape_sequences_as_visible_text() -> None:
    """`quarantine show` of a record with `[/x]`, escape sequences and 300 levels prints, and nothing raw."""
    text = rendered(cli_quarantine.print_detail, item_detail(hostile_item(300)))
    plain = without_styles(text)
    assert "[/x]" in plain and "nested deeper than" in plain
    assert "\\x1b[2J" in plain and "\\x9b" in plain and "\\u202e" in plain
    assert "\x1b" not in plain and "\x07" not in plain and "\x9b" not in plain and "\u202e" not in plain


def test_list_prints_markup_and_escape_sequences_as_visible_text() -> None:
    """`quarantine list` of such a record prints its row and counts, with nothing raw."""
    from app.review.store import Page

    item = hostile_item(3)
    tally = Tally()
    tally.add(item)
    page = Page(total=1, offset=0, limit=10, records=[item_summary(item)], counts=tally.as_dict())
    plain = without_styles(rendered(cli_quarantine.print_page, page))
    assert "[/x]" in plain and "quarantine: 1 matching" in plain
    assert "\x1b" not in plain and "\x07" not in plain and "\x9b" not in plain


def test_json_output_escapes_c1_and_bidi_and_stays_json() -> None:
    """--json output is valid JSON with DEL, C1 and bidi characters escaped (orjson writes them raw)."""
    text = cli_quarantine._json_text({"v": HOSTILE + "\x7f", "n": [1, 2]}, indent=True)
    assert "\x9b" not in text and "\u202e" not in text and "\x7f" not in text and "\x1b" not in text
    assert orjson.loads(text)["v"] == HOSTILE + "\x7f"


def test_tally_counts_in_bounded_memory() -> None:
    """Counting thousands of distinct sources keeps at most MAX_COUNTED of them, the rest as (other)."""
    from byzguard.review import MAX_COUNTED, OTHER

    tally = Tally()
    base = hostile_item(1)
    for n in range(MAX_COUNTED + 500):
        record = base.record.__class__(**{**{f: getattr(base.record, f) for f in base.record.__slots__},
                                          "source": f"s{n}"})
        tally.add(ReviewItem(record, None, Status.PENDING, None, None))
    sources = tally.as_dict()["source"]
    assert len(sources) == MAX_COUNTED + 1 and sources[OTHER] == 500
