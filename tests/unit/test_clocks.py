"""Lamport and vector clocks: known answers, strict parsing, and the algebra as properties."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from byzguard.clocks import (
    MAX_COUNTER,
    MAX_ENTRIES,
    Order,
    VectorClock,
    _parse_entries,
    hlc_tick,
    lamport_mark_key,
    lamport_merge,
    lamport_tick,
    parse_lamport,
)
from byzguard.errors import ClockError


def vc(**entries: int) -> VectorClock:
    return VectorClock(entries)


# --- strategies -----------------------------------------------------------------------------------------

# Few node names and small counters, so that generated clocks often share entries and are comparable.
small_clocks = st.dictionaries(st.sampled_from("abcde"), st.integers(0, 4), max_size=5).map(VectorClock)

node_ids = st.text(
    st.characters(blacklist_characters=",:= ", blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Z")),
    min_size=1,
    max_size=12,
).filter(str.isprintable)
counters = st.one_of(st.integers(0, 1000), st.integers(0, MAX_COUNTER))
any_clocks = st.dictionaries(node_ids, counters, max_size=MAX_ENTRIES).map(VectorClock)


def reference_compare(a: VectorClock, b: VectorClock) -> Order:
    """Textbook comparison over the union of nodes, to check the optimized one against."""
    nodes = set(a.entries()) | set(b.entries())
    le = all(a.get(n) <= b.get(n) for n in nodes)
    ge = all(a.get(n) >= b.get(n) for n in nodes)
    if le and ge:
        return Order.EQUAL
    if le:
        return Order.BEFORE
    return Order.AFTER if ge else Order.CONCURRENT


# --- Lamport ---------------------------------------------------------------------------------------------


def test_lamport_tick_and_merge() -> None:
    """tick adds one and merge takes the maximum plus one, whichever side is larger."""
    assert lamport_tick(0) == 1
    assert lamport_merge(3, 7) == 8
    assert lamport_merge(7, 3) == 8
    assert lamport_merge(5, 5) == 6


def test_hlc_tick_follows_the_wall_clock_and_never_goes_back() -> None:
    """A hybrid clock reads the wall clock in microseconds, and counts on when the wall clock is not ahead."""
    assert hlc_tick(0, 1_000) == 1_000
    assert hlc_tick(1_000, 1_000) == 1_001
    assert hlc_tick(5_000, 1_000) == 5_001  # the wall clock went back: still monotonic
    assert hlc_tick(5, -3) == 6
    with pytest.raises(ClockError):
        hlc_tick(MAX_COUNTER, 0)


def test_lamport_mark_key_separates_instances() -> None:
    """One mark per source without an instance, one per (source, instance) with one."""
    assert lamport_mark_key("pricing", None) == b"pricing"
    assert lamport_mark_key("pricing", "a") == b"pricing\x00a"
    assert lamport_mark_key("pricing", "a") != lamport_mark_key("pricing", "b")


def test_lamport_bounds() -> None:
    """Lamport arithmetic refuses to leave [0, 2**63) rather than wrap or grow past int64."""
    with pytest.raises(ClockError):
        lamport_tick(MAX_COUNTER)
    with pytest.raises(ClockError):
        lamport_merge(0, MAX_COUNTER)
    with pytest.raises(ClockError):
        lamport_merge(-1, 3)


@pytest.mark.parametrize(("raw", "expected"), [
    (b"0", 0), ("42", 42), (str(MAX_COUNTER).encode(), MAX_COUNTER),
])
def test_parse_lamport_accepts_plain_decimal(raw: bytes | str, expected: int) -> None:
    """parse_lamport reads plain ASCII decimal, as bytes or str, up to 2**63-1. (A library helper the guard does
    not call: decode reads ce_lamporttime with envelope._int, which also takes leading zeros: b"01" is 1.)"""
    assert parse_lamport(raw) == expected


@pytest.mark.parametrize("raw", [
    b"", b"-1", b"+1", b" 1", b"1 ", b"1_000", b"01", b"1.0", b"0x10", "٣", "²",
    str(2**63).encode(), b"\xff", b"99999999999999999999999",
])
def test_parse_lamport_rejects_malformed(raw: bytes | str) -> None:
    """Anything but canonical ASCII decimal below 2**63 is a ClockError, including what int() accepts."""
    with pytest.raises(ClockError):
        parse_lamport(raw)


# --- comparison ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "expected"), [
    (vc(), vc(), Order.EQUAL),
    (vc(a=1, b=2), vc(b=2, a=1), Order.EQUAL),
    (vc(a=1), vc(a=2), Order.BEFORE),
    (vc(a=2), vc(a=1), Order.AFTER),
    (vc(), vc(a=1), Order.BEFORE),
    (vc(a=1), vc(a=1, b=1), Order.BEFORE),  # missing entry b counts as 0
    (vc(a=1, b=1), vc(a=1), Order.AFTER),
    (vc(a=1, b=5), vc(a=2, b=5, c=1), Order.BEFORE),
    (vc(a=2), vc(b=1), Order.CONCURRENT),  # disjoint nodes
    (vc(a=2, b=1), vc(a=1, b=2), Order.CONCURRENT),
    (vc(a=1, b=1), vc(a=2, c=1), Order.CONCURRENT),  # b only on the left, c only on the right
    (vc(a=3, b=1, c=1), vc(a=3, b=1, d=1), Order.CONCURRENT),
])
def test_compare_known_answers(a: VectorClock, b: VectorClock, expected: Order) -> None:
    """compare places clocks in the happened-before order, treating missing entries as 0."""
    assert a.compare(b) is expected
    assert reference_compare(a, b) is expected


def test_dominates_and_descends() -> None:
    """dominates is strictly after; descends is after or equal; neither holds for concurrent clocks."""
    assert vc(a=2, b=1).dominates(vc(a=1))
    assert not vc(a=1).dominates(vc(a=1))
    assert vc(a=1).descends(vc(a=1))
    assert not vc(a=1).dominates(vc(b=1))
    assert not vc(a=1).descends(vc(b=1))
    assert vc(a=1).descends(vc())


# --- construction and value semantics ---------------------------------------------------------------------


def test_zero_entries_are_omitted() -> None:
    """A zero counter means the same as no entry, so clocks that differ only by zeros are equal."""
    assert vc(a=0, b=2) == vc(b=2)
    assert vc(a=0).to_header() == b""
    assert VectorClock.from_header("a=0,b=2") == vc(b=2)
    assert VectorClock.from_mapping({"a": 0}) == VectorClock()
    assert dict(vc(a=0, b=2).entries()) == {"b": 2}


def test_clock_is_immutable_and_hashable() -> None:
    """Clocks cannot be changed after construction and equal clocks hash alike, so they can key dicts."""
    clock = vc(a=1)
    with pytest.raises(AttributeError):
        clock._d = {}
    with pytest.raises(TypeError):
        clock.entries()["a"] = 5  # type: ignore[index]
    assert clock.tick("a") == vc(a=2) and clock == vc(a=1)
    assert hash(vc(a=1, b=2)) == hash(VectorClock.from_header("b=2,a=1"))
    assert {vc(a=1): "x"}[vc(a=1)] == "x"
    assert pickle.loads(pickle.dumps(vc(a=1, b=2))) == vc(a=1, b=2)


def test_tick_refuses_to_overflow() -> None:
    """Ticking a counter already at 2**63-1 is a ClockError, not a silent bigint."""
    with pytest.raises(ClockError, match="bound"):
        VectorClock({"a": MAX_COUNTER}).tick("a")


def test_tick_validates_a_new_node_id() -> None:
    """tick refuses a node id that the header encoding could not carry."""
    with pytest.raises(ClockError):
        vc().tick("a,b")


# --- header encoding ---------------------------------------------------------------------------------------


def test_to_header_is_sorted_and_compact() -> None:
    """The header lists entries sorted by node id as node=counter, and the empty clock is empty bytes."""
    assert vc(b=5, a=3).to_header() == b"a=3,b=5"
    assert VectorClock().to_header() == b""
    assert VectorClock.from_header(b"") == VectorClock()


def test_from_header_accepts_bytes_and_str_in_any_order() -> None:
    """Bytes and str parse alike, and entry order on the wire does not matter."""
    assert VectorClock.from_header(b"b=5,a=3") == VectorClock.from_header("a=3,b=5") == vc(a=3, b=5)
    assert VectorClock.from_header("zürich-svc=7").get("zürich-svc") == 7
    assert VectorClock.from_header(f"a={MAX_COUNTER}").get("a") == MAX_COUNTER
    assert VectorClock.from_header(f"a={10**18 - 1},b={10**18}").to_dict() == {"a": 10**18 - 1, "b": 10**18}


@pytest.mark.parametrize("raw", [
    "a=", "=3", "a=-1", "a=1,a=2", "a=1;b=2", "a=٣", f"a={2**63}", "a=99999999999999999999",
    "a", "a=1,", ",a=1", "a=1,,b=2", "a=1, b=2", " a=1", "a=1 ", "a=+1", "a=01", "a=1_0", "a=0x1",
    "a:b=1", "a=1=2", "a\tb=1", "a\x00=1", "a=1\n", " ", ",", "=", "a==1", "a=²",
    b"\xff=1", b"a=1\xc3",
])
def test_from_header_rejects_malformed(raw: str | bytes) -> None:
    """Every malformed header is a ClockError rather than a guess at what the producer meant."""
    with pytest.raises(ClockError):
        VectorClock.from_header(raw)


def test_from_header_errors_say_what_is_wrong() -> None:
    """Error messages name the offending part so the quarantine reason is actionable."""
    with pytest.raises(ClockError, match="more than once"):
        VectorClock.from_header("a=1,a=2")
    with pytest.raises(ClockError, match=r"decimal integer.*got '1;b=2'"):
        VectorClock.from_header("a=1;b=2")
    with pytest.raises(ClockError, match="node id"):
        VectorClock.from_header("=3")
    with pytest.raises(ClockError, match="2\\*\\*63"):
        VectorClock.from_header(f"a={2**63}")


def test_entry_bound_names_count_and_bound() -> None:
    """64 entries parse; 65 are refused with a message naming both numbers; the bound is adjustable."""
    sixty_four = ",".join(f"n{i}=1" for i in range(MAX_ENTRIES))
    assert len(VectorClock.from_header(sixty_four).entries()) == MAX_ENTRIES
    with pytest.raises(ClockError, match=r"65 entries.*bound of 64"):
        VectorClock.from_header(sixty_four + ",extra=1")
    with pytest.raises(ClockError, match=r"65 entries.*bound of 64"):
        VectorClock.from_mapping({f"n{i}": 1 for i in range(65)})
    with pytest.raises(ClockError, match=r"3 entries.*bound of 2"):
        VectorClock.from_header("a=1,b=1,c=1", max_entries=2)


# --- mapping (structured events) ------------------------------------------------------------------------


def test_from_mapping_accepts_a_json_object() -> None:
    """A JSON object of node -> integer is the structured-mode form of the same clock."""
    assert VectorClock.from_mapping({"b": 5, "a": 3}) == vc(a=3, b=5)
    assert vc(b=5, a=3).to_dict() == {"a": 3, "b": 5}


@pytest.mark.parametrize("raw", [
    None, [], "a=1", [["a", 1]], {"a": True}, {"a": 1.0}, {"a": "1"}, {"a": -1}, {"a": 2**63},
    {1: 1}, {"": 1}, {"a,b": 1}, {"a=b": 1}, {"a:b": 1}, {"a b": 1}, {"a\n": 1}, {"a": None},
])
def test_from_mapping_rejects_malformed(raw: object) -> None:
    """Booleans, floats, strings, negatives, oversize counters and bad node ids are all ClockErrors."""
    with pytest.raises(ClockError):
        VectorClock.from_mapping(raw)


def test_constructor_validates() -> None:
    """Building a clock in code checks node ids and counters like the parsers do."""
    with pytest.raises(ClockError):
        VectorClock({"a": -1})
    with pytest.raises(ClockError):
        VectorClock({"a=": 1})


# --- properties -------------------------------------------------------------------------------------------


@given(small_clocks, small_clocks)
def test_compare_is_antisymmetric_and_matches_reference(a: VectorClock, b: VectorClock) -> None:
    """BEFORE one way is AFTER the other, EQUAL and CONCURRENT are symmetric, all as the textbook says."""
    forward, backward = a.compare(b), b.compare(a)
    assert forward is reference_compare(a, b)
    mirror = {Order.BEFORE: Order.AFTER, Order.AFTER: Order.BEFORE,
              Order.EQUAL: Order.EQUAL, Order.CONCURRENT: Order.CONCURRENT}
    assert backward is mirror[forward]
    assert (forward is Order.EQUAL) == (a == b)
    assert a.dominates(b) == (forward is Order.AFTER)
    assert a.descends(b) == (forward in (Order.AFTER, Order.EQUAL))


@given(small_clocks, small_clocks, small_clocks)
def test_merge_is_a_join(a: VectorClock, b: VectorClock, c: VectorClock) -> None:
    """merge is commutative, associative and idempotent, and the result descends from both inputs."""
    m = a.merge(b)
    assert m == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a
    assert m.compare(a) in (Order.AFTER, Order.EQUAL)
    assert m.compare(b) in (Order.AFTER, Order.EQUAL)
    for node in set(a.entries()) | set(b.entries()):
        assert m.get(node) == max(a.get(node), b.get(node))


@given(small_clocks, st.sampled_from("abcdef"))
def test_tick_is_strictly_after(clock: VectorClock, node: str) -> None:
    """A ticked clock is strictly AFTER the original and differs from it only at the ticked node."""
    ticked = clock.tick(node)
    assert ticked.compare(clock) is Order.AFTER
    assert clock.compare(ticked) is Order.BEFORE
    assert ticked.dominates(clock)
    assert ticked.get(node) == clock.get(node) + 1


@given(any_clocks)
def test_header_and_mapping_round_trip(clock: VectorClock) -> None:
    """to_header/from_header and to_dict/from_mapping reproduce the clock, whatever its node ids."""
    header = clock.to_header()
    assert VectorClock.from_header(header) == clock
    assert VectorClock.from_header(header.decode()) == clock
    assert VectorClock.from_mapping(clock.to_dict()) == clock


def _agrees_with_reference_parser(text: str) -> None:
    """from_header accepts `text` exactly when the entry-by-entry parser does, and then gives an equal clock."""
    try:
        expected: VectorClock | None = VectorClock(_parse_entries(text)) if text else VectorClock()
    except ClockError:
        expected = None
    if expected is None:
        with pytest.raises(ClockError):
            VectorClock.from_header(text)
    else:
        assert VectorClock.from_header(text) == expected


@given(st.text(st.sampled_from("ab=,019:-+ ٣\t\x00é"), max_size=30))
def test_fast_path_agrees_with_reference_parser(text: str) -> None:
    """from_header's fast path accepts exactly what the entry-by-entry parser accepts, with equal results."""
    _agrees_with_reference_parser(text)


@settings(max_examples=400)
@given(st.one_of(
    st.text(st.sampled_from("ab=:,019 \t\u2003\u00a0\u0085\u200bé٣"), max_size=12),
    st.builds(lambda node, n: f"{node}={n}", st.text(st.sampled_from("ab:= \u2003\u00a0é"), max_size=4),
              st.one_of(st.integers(min_value=0, max_value=2**64), st.sampled_from(["007", "+1", "1_0", "٣"])))))
def test_one_entry_fast_path_agrees_with_reference_parser(text: str) -> None:
    """A clock of one entry (no comma), which from_header reads without its regex, is accepted exactly when the
    entry-by-entry parser accepts it, with the same counter; Unicode spaces and long counters included."""
    _agrees_with_reference_parser(text)
