"""Lamport and vector clocks: the arithmetic, the comparison, and strict parsing of what producers send.

Counters are non-negative integers below 2**63 so that every producer language (Java longs, Go int64,
TypeScript bigint) can represent them; anything else is the event's fault and raises `ClockError`.

A vector clock travels as a header `a=3,b=5` (sorted by node id, zero entries omitted, empty clock = b"")
or, in structured events, as a JSON object `{"a": 3, "b": 5}`. Node ids are non-empty, printable, contain
no whitespace and none of `,` `:` `=`, so the header encoding is unambiguous.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from byzguard.errors import ClockError

MAX_COUNTER: Final = 2**63 - 1
"""The largest Lamport time or vector clock counter accepted (int64 max)."""

MAX_ENTRIES: Final = 64
"""Default bound on the number of entries in a parsed vector clock (a trust-boundary limit on input size)."""

_MAX_COUNTER_DIGITS: Final = len(str(MAX_COUNTER))
_SHOW: Final = 60  # how much of a bad value an error message quotes; headers can be large


class Order(StrEnum):
    """How a clock relates to another in the happened-before partial order."""

    BEFORE = "before"
    AFTER = "after"
    EQUAL = "equal"
    CONCURRENT = "concurrent"


# Module constants: looking a member up on the Enum class costs more than the whole comparison loop.
_BEFORE: Final = Order.BEFORE
_AFTER: Final = Order.AFTER
_EQUAL: Final = Order.EQUAL
_CONCURRENT: Final = Order.CONCURRENT


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW else text[:_SHOW] + "..."


def _parse_counter(text: str, what: str) -> int:
    # int() alone would accept "+3", " 3", "3_0" and non-ASCII digits such as "٣"; producers must send
    # plain ASCII decimal, and without leading zeros so each value has exactly one encoding.
    if (
        not text
        or not text.isascii()
        or not text.isdigit()
        or (text[0] == "0" and len(text) > 1)
        or len(text) > _MAX_COUNTER_DIGITS
    ):
        raise ClockError(f"{what} must be a decimal integer in [0, 2**63) without sign or leading zeros, "
                         f"got {_show(text)}")
    value = int(text)
    if value > MAX_COUNTER:
        raise ClockError(f"{what} {value} exceeds the bound 2**63-1")
    return value


def _check_counter(value: object, what: str) -> int:
    # bool is an int subclass, and JSON true must not count as 1.
    if type(value) is not int:
        raise ClockError(f"{what} must be an integer, got {_show(value)}")
    if not 0 <= value <= MAX_COUNTER:
        raise ClockError(f"{what} must be in [0, 2**63), got {value}")
    return value


def _check_node(node: object) -> str:
    if type(node) is not str:
        raise ClockError(f"vector clock node id must be a string, got {_show(node)}")
    if (
        not node
        or ":" in node
        or "=" in node
        or "," in node
        or " " in node
        or not node.isprintable()  # also rejects tabs, newlines and other non-space whitespace
    ):
        raise ClockError(f"invalid vector clock node id {_show(node)}: it must be non-empty, printable, "
                         "without whitespace and without ',', ':' or '='")
    return node


# The canonical header: what to_header writes. Counters here have at most 18 digits, so they are below
# 2**63 without a check, and none is 0. Headers outside it (zero entries, 19-digit counters, or errors)
# take the entry-by-entry parser. The isprintable() check that accompanies it excludes the control
# characters that \s does not.
_CANONICAL_RE: Final = re.compile(r"[^,:=\s]+=[1-9][0-9]{0,17}(?:,[^,:=\s]+=[1-9][0-9]{0,17})*")


def _parse_entries(text: str) -> dict[str, int]:
    # The reference parser for a non-empty header: slow, but every rejection says what is wrong.
    d: dict[str, int] = {}
    for entry in text.split(","):
        node, sep, digits = entry.partition("=")
        if not sep:
            raise ClockError(f"vector clock entry {_show(entry)} is not of the form node=counter")
        if node in d:
            raise ClockError(f"vector clock names node {_show(node)} more than once")
        counter = _parse_counter(digits, f"vector clock counter of node {_show(node)}")
        d[_check_node(node)] = counter
    # Zero entries are accepted (they mean "no entry") but not kept, so equal clocks compare equal.
    return {node: counter for node, counter in d.items() if counter}


def _validated(m: Mapping[Any, Any]) -> dict[str, int]:
    d: dict[str, int] = {}
    for node, counter in m.items():
        _check_node(node)
        if _check_counter(counter, f"vector clock counter of node {_show(node)}"):
            d[node] = counter
    return d


# --- Lamport clocks -------------------------------------------------------------------------------------


def lamport_tick(t: int) -> int:
    """The Lamport time of the next local event after time `t`."""
    if not 0 <= t < MAX_COUNTER:
        raise ClockError(f"cannot tick Lamport time {t}: it must be in [0, 2**63-1)")
    return t + 1


def lamport_merge(local: int, received: int) -> int:
    """The Lamport time after receiving a message stamped `received`: max(local, received) + 1."""
    for t in (local, received):
        if not 0 <= t <= MAX_COUNTER:
            raise ClockError(f"Lamport time {t} is outside [0, 2**63)")
    return lamport_tick(max(local, received))


def hlc_tick(last: int, now_us: int) -> int:
    """The next time of a hybrid logical clock: the wall clock in microseconds, or `last` + 1 when that is not
    ahead of it. Monotonic within a process, and a restarted process starts above what it sent before (unless
    its wall clock went back, or it sent more than one event per microsecond)."""
    if not 0 <= last < MAX_COUNTER:
        raise ClockError(f"cannot tick hybrid logical time {last}: it must be in [0, 2**63-1)")
    return max(last + 1, min(max(now_us, 0), MAX_COUNTER))


MAX_INSTANCE_LEN: Final = 64
"""The longest producer instance id (`ce_lamportinstance`) accepted: it becomes part of a state key."""


def check_instance(instance: str) -> str:
    """A producer instance id as sent: 1 to 64 printable characters without whitespace; else ClockError."""
    if not instance or len(instance) > MAX_INSTANCE_LEN or not instance.isprintable() or " " in instance:
        raise ClockError(f"Lamport instance must be 1 to {MAX_INSTANCE_LEN} printable characters without "
                         f"whitespace, got {_show(instance)}")
    return instance


def lamport_mark_key(source: str, instance: str | None) -> bytes:
    """The key of the guard's Lamport high-water mark: one per source, or per (source, instance) when the
    event names the producer instance whose clock it carries (so replicas of one source never regress)."""
    if instance is None:
        return source.encode()
    return f"{source}\x00{instance}".encode()  # an instance has no NUL (printable), so the split is unique


def parse_lamport(raw: bytes | str) -> int:
    """Parse a Lamport time header: ASCII decimal in [0, 2**63); anything else raises ClockError."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ClockError(f"Lamport time is not ASCII: {_show(raw)}") from None
    elif not isinstance(raw, str):
        raise ClockError(f"Lamport time must be bytes or str, got {_show(raw)}")
    return _parse_counter(raw, "Lamport time")


# --- Vector clocks --------------------------------------------------------------------------------------


class VectorClock:
    """An immutable, hashable vector clock: node id -> counter, zero entries omitted.

    `compare` places two clocks in the happened-before order; `merge` is the pointwise maximum.
    The constructor validates node ids and counters; only the parsers (`from_header`, `from_mapping`)
    also bound the number of entries, because that bound guards against oversized input, not arithmetic.
    """

    __slots__ = ("_d", "_hash", "_header", "_view")

    _d: dict[str, int]
    _hash: int
    _header: bytes
    _view: Mapping[str, int]

    def __init__(self, entries: Mapping[str, int] | None = None) -> None:
        object.__setattr__(self, "_d", _validated(entries) if entries else {})

    @classmethod
    def _of(cls, d: dict[str, int]) -> VectorClock:
        # Trusted construction from an already-validated dict that nobody else holds. The cached hash
        # and view slots stay unset until first use: every setattr here costs as much as a compare.
        vc = _new(cls)
        _set_d(vc, d)
        return vc

    # --- parsing ---

    @classmethod
    def from_header(cls, raw: bytes | str, *, max_entries: int = MAX_ENTRIES) -> VectorClock:
        """Parse the header encoding `a=3,b=5` (any entry order); raise ClockError on anything malformed."""
        if isinstance(raw, bytes):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ClockError(f"vector clock header is not UTF-8: {_show(raw)}") from None
        elif isinstance(raw, str):
            text = raw
        else:
            raise ClockError(f"vector clock header must be bytes or str, got {_show(raw)}")
        if not text:
            return cls._of({})
        if "," not in text:
            # One entry, as one source's clock is: the checks of _CANONICAL_RE without the regex call (a
            # printable text has no whitespace but the space).
            node, _, digits = text.partition("=")
            if (digits.isdigit() and digits.isascii() and digits[0] != "0" and len(digits) <= 18
                    and node and text.isprintable() and " " not in node and ":" not in node):
                vc = _new(cls)
                _set_d(vc, {node: int(digits)})
                return vc
        # Bound the work before splitting: a hostile header may be large.
        count = text.count(",") + 1
        if count > max_entries:
            raise ClockError(f"vector clock has {count} entries, more than the bound of {max_entries}")
        # Fast path: one C-level match validates the whole grammar, so the loop only builds the dict.
        if text.isprintable() and _CANONICAL_RE.fullmatch(text):
            d: dict[str, int] = {}
            for entry in text.split(","):
                node, _, digits = entry.partition("=")
                d[node] = int(digits)
            if len(d) == count:  # else a node repeats: let the reference parser name it
                return cls._of(d)
        return cls._of(_parse_entries(text))

    @classmethod
    def from_mapping(cls, m: object, *, max_entries: int = MAX_ENTRIES) -> VectorClock:
        """Build from a JSON object of node -> integer counter; raise ClockError on anything malformed."""
        if not isinstance(m, Mapping):
            raise ClockError(f"vector clock must be an object of node -> counter, got {_show(m)}")
        if len(m) > max_entries:
            raise ClockError(f"vector clock has {len(m)} entries, more than the bound of {max_entries}")
        return cls._of(_validated(m))

    # --- encoding ---

    def to_header(self) -> bytes:
        """The compact header encoding, sorted by node id: b"a=3,b=5"; the empty clock is b""."""
        try:
            return self._header  # computed once per clock: clocks are immutable, and memoized ones are shared
        except AttributeError:
            header = ",".join([f"{node}={self._d[node]}" for node in sorted(self._d)]).encode()
            _set_header(self, header)
            return header

    def __len__(self) -> int:
        """The number of non-zero entries."""
        return len(self._d)

    def to_dict(self) -> dict[str, int]:
        """A new dict of the non-zero entries, sorted by node id (for JSON)."""
        return {node: self._d[node] for node in sorted(self._d)}

    # --- access ---

    def get(self, node: str) -> int:
        """The counter of `node`; 0 when absent."""
        return self._d.get(node, 0)

    def entries(self) -> Mapping[str, int]:
        """A read-only view of the non-zero entries, node -> counter."""
        try:
            return self._view
        except AttributeError:
            view = MappingProxyType(self._d)
            object.__setattr__(self, "_view", view)
            return view

    # --- arithmetic ---

    def tick(self, node: str) -> VectorClock:
        """The clock after a local event on `node`: its counter plus one."""
        counter = self._d.get(node)
        if counter is None:
            _check_node(node)
            counter = 0
        elif counter >= MAX_COUNTER:
            raise ClockError(f"cannot tick node {_show(node)}: its counter is at the bound 2**63-1")
        d = dict(self._d)
        d[node] = counter + 1
        return VectorClock._of(d)

    def merge(self, other: VectorClock) -> VectorClock:
        """The pointwise maximum of both clocks: the least clock that descends from both."""
        big, small = (self, other) if len(self._d) >= len(other._d) else (other, self)
        d = big._d
        copied = False
        for node, counter in small._d.items():
            if counter > d.get(node, 0):
                if not copied:
                    d = dict(d)
                    copied = True
                d[node] = counter
        # Clocks are immutable, so when `big` already covers `small` it is the answer itself.
        return VectorClock._of(d) if copied else big

    # --- comparison ---

    def compare(self, other: VectorClock) -> Order:
        """Where this clock stands relative to `other`: BEFORE, AFTER, EQUAL or CONCURRENT."""
        a = self._d
        b = other._d
        if a == b:  # C-level, and the common case for duplicates
            return _EQUAL
        # Zero entries are omitted, so b <= a needs b's nodes to be a subset of a's: fewer nodes rules it out.
        # b <= a and a != b is exactly AFTER, so one loop settles it, breaking at the first counter ahead.
        # AFTER is tested first because it is the common answer: a new event against the state it follows.
        if len(b) <= len(a):
            get = a.get
            for node, counter in b.items():
                if counter > get(node, 0):
                    break
            else:
                return _AFTER
        if len(a) <= len(b):
            get = b.get
            for node, counter in a.items():
                if counter > get(node, 0):
                    break
            else:
                return _BEFORE
        return _CONCURRENT

    def descends(self, other: VectorClock) -> bool:
        """True when this clock is AFTER or EQUAL to `other` (every counter >= other's)."""
        get = self._d.get
        # A plain loop, not all(<generator>): this sits on the per-event path and the generator costs ~2x.
        for node, counter in other._d.items():  # noqa: SIM110
            if counter > get(node, 0):
                return False
        return True

    def dominates(self, other: VectorClock) -> bool:
        """True when this clock is strictly AFTER `other` (descends from it and differs)."""
        return len(self._d) >= len(other._d) and self._d != other._d and self.descends(other)

    # --- value semantics ---

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VectorClock):
            return NotImplemented
        return self._d == other._d

    def __hash__(self) -> int:
        try:
            return self._hash
        except AttributeError:
            h = hash(frozenset(self._d.items()))
            object.__setattr__(self, "_hash", h)
            return h

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("VectorClock is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("VectorClock is immutable")

    def __reduce__(self) -> tuple[type[VectorClock], tuple[dict[str, int]]]:
        return (VectorClock, (dict(self._d),))

    def __repr__(self) -> str:
        return f"VectorClock({self.to_dict()!r})"


# The trusted constructor's two steps, looked up once: object.__setattr__ is refused on the class itself.
_new: Final = object.__new__
_set_d: Final = VectorClock.__dict__["_d"].__set__
_set_header: Final = VectorClock.__dict__["_header"].__set__


#: Bounds of a memo of clocks by their text (`remember`): its entries, and the longest text it keeps.
MEMO_MAX: Final = 1024
MEMO_KEY_MAX: Final = 512


def remember(memo: dict[Any, VectorClock], key: str | bytes, vclock: VectorClock) -> VectorClock:
    """`vclock`, kept under its text `key` in `memo` (the reader looks it up there first; clocks are immutable, so
    one object serves every reader of the same text). Bounded against hostile input: cleared when full, and a
    text longer than MEMO_KEY_MAX is not kept (1,024 long clocks could take a gigabyte)."""
    if len(key) <= MEMO_KEY_MAX:
        if len(memo) >= MEMO_MAX:
            memo.clear()
        memo[key] = vclock
    return vclock
