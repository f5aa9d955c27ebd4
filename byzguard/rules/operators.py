"""The fast path's operators: CEL's operators and functions on the values the closures read.

Each takes operand values and returns the result, raises _CelError (a CEL error value) or _Bail (celpy decides
this event). The closures and the generated code share them.
"""

from __future__ import annotations

import datetime as dt
import operator
import re
from collections.abc import Callable
from typing import Any, Final

import re2  # type: ignore[import-untyped]  # celpy's own regex engine: `matches` is RE2
from celpy import celtypes
from celpy.evaluation import CELEvalError

from byzguard.rules.conversion import _as_timestamp, _dt_sub, _int_new, _td_new, _TimestampType, _to_cel
from byzguard.rules.environment import (
    _DOUBLE_TYPES,
    _NUMBER_TYPES,
    _Binary,
    _cel_in,
    _cel_type_name,
    _equal,
    _float_div,
    _plain,
)
from byzguard.rules.wording import _describe_error


class _CelError(Exception):
    """A CEL error value: the rule's outcome is invariant.error unless `&&`, `||` or has() absorbs it."""


class _Bail(Exception):
    """The fast path can't tell what celpy would make of this: celpy evaluates the rule for this event."""


class _PlainStr(str):
    """A string made by `+`: celpy makes a plain `str` there, which (unlike StringType) has no contains()."""

    __slots__ = ()


_IntType = celtypes.IntType
_UintType = celtypes.UintType
_BoolType = celtypes.BoolType
_ListType = celtypes.ListType
_MapType = celtypes.MapType

_DurationType = celtypes.DurationType

# Value kinds, by exact type: a dict lookup is cheaper than a chain of isinstance checks.
_NULL, _BOOL, _INT, _UINT, _DOUBLE, _STRING, _BYTES, _LIST, _MAP, _TIMESTAMP, _DURATION, _OTHER = range(12)
_KIND_NAMES: Final = ("null", "bool", "int", "uint", "double", "string", "bytes", "list", "map", "timestamp",
                      "duration")
_KINDS: Final[dict[type, int]] = {
    type(None): _NULL, bool: _BOOL, _BoolType: _BOOL, _IntType: _INT, _UintType: _UINT, float: _DOUBLE,
    celtypes.DoubleType: _DOUBLE, str: _STRING, celtypes.StringType: _STRING, _PlainStr: _STRING,
    bytes: _BYTES, celtypes.BytesType: _BYTES, list: _LIST, _ListType: _LIST, dict: _MAP, _MapType: _MAP,
    _TimestampType: _TIMESTAMP, _DurationType: _DURATION,
}
_NUMERIC: Final = frozenset({_INT, _UINT, _DOUBLE})
_SAME_KIND_ORDERED: Final = frozenset({_BOOL, _DOUBLE, _STRING, _BYTES, _TIMESTAMP, _DURATION})
_DIRECTLY_ORDERED: Final = frozenset({float, str, celtypes.DoubleType, celtypes.StringType, _TimestampType,
                                      _DurationType})
_NOT_ARITHMETIC: Final = frozenset({_NULL, _STRING, _LIST, _MAP})


def _kind(value: Any) -> int:
    return _KINDS.get(type(value), _OTHER)


def _kind_name(value: Any) -> str:
    kind = _kind(value)
    return _KIND_NAMES[kind] if kind != _OTHER else _cel_type_name(value)


def _mismatch(symbol: str, *values: Any) -> _CelError:
    kinds = [_kind_name(value) for value in values]
    if len(kinds) == 2 and not symbol.endswith("()"):
        return _CelError(f"no matching overload for {kinds[0]} {symbol} {kinds[1]}")
    return _CelError(f"no matching overload for {symbol} on {', '.join(kinds)}")


def _quote(value: Any) -> str:
    return repr(str(value)) if _kind(value) == _STRING else f"{_kind_name(value)} {value}"


def _lazy(value: Any) -> Any:
    """A value read out of plain JSON, as `_to_cel` would have it: every number a double."""
    return float(value) if type(value) is int else value


def _deep(value: Any) -> Any:
    """A value as celpy holds it, for the helpers shared with celpy: plain JSON containers converted."""
    kind = type(value)
    return _to_cel(value) if kind is dict or kind is list else value


_INT_MIN: Final = -(2**63)
_INT_END: Final = 2**63
_UINT_END: Final = 2**64


def _int(value: int) -> Any:
    if _INT_MIN <= value < _INT_END:
        return _int_new(_IntType, value)
    raise _CelError("int overflow")


def _uint(value: int) -> Any:
    if 0 <= value < _UINT_END:
        return _int_new(_UintType, value)
    raise _CelError("uint overflow")


def _call(function: Callable[[Any], Any], value: Any) -> Any:
    """A celtypes conversion, with the errors celpy's function_eval turns into error values."""
    try:
        return function(value)
    except (ValueError, TypeError, AttributeError) as exc:
        raise _CelError(f"{function.__name__.removesuffix('Type').lower()}(): {_describe_error(exc)}") from None


def _variable_error(value: CELEvalError) -> _CelError:
    return _CelError(_describe_error(value))


# --- the fast path: operators ------------------------------------------------------------------------------
#
# Each takes operand values and returns the result or raises _CelError/_Bail. The type combinations
# handled here, and the ones declared errors, mirror what celpy does with environment._FUNCTIONS; the kind
# matrix test in tests/unit/test_rules_operators.py checks every pair of kinds against celpy.


def _ordering_op(compare: Callable[[Any, Any], bool], symbol: str) -> Callable[[Any, Any], bool]:
    def ordered(a: Any, b: Any) -> bool:
        kind_a = type(a)
        if kind_a is type(b) and kind_a in _DIRECTLY_ORDERED:
            return compare(a, b)
        ka, kb = _kind(a), _kind(b)
        if ka == kb:
            if ka in _SAME_KIND_ORDERED:
                return compare(a, b)
            if ka in (_INT, _UINT):
                return compare(int(a), int(b))
            if ka == _OTHER:
                raise _Bail
            raise _mismatch(symbol, a, b)  # null, lists and maps have no order
        if ka in _NUMERIC and kb in _NUMERIC:
            return compare(_plain(a), _plain(b))
        if ka == _OTHER or kb == _OTHER or (ka == _BOOL and kb in _NUMERIC) or (kb == _BOOL and ka in _NUMERIC):
            raise _Bail  # celpy compares `true < 2` as Python ints, but refuses `2 > true`
        raise _mismatch(symbol, a, b)

    return ordered


def _eq(a: Any, b: Any) -> bool:
    kind_a = type(a)
    if kind_a is type(b) and (kind_a is float or kind_a is str):
        return bool(a == b)
    if a is None or b is None:
        return a is b
    return _equal(_deep(a), _deep(b))


def _ne(a: Any, b: Any) -> bool:
    return not _eq(a, b)


def _in(item: Any, container: Any) -> Any:
    kind = type(container)
    if kind is dict and _kind(item) == _STRING:
        return item in container  # JSON keys are all strings: membership is celpy's key-by-key equality
    if kind is _ListType or isinstance(container, _MapType):
        result = _cel_in(_deep(item), container)
    elif kind is list or kind is dict:
        result = _cel_in(_deep(item), _to_cel(container))
    else:
        if _kind(container) in {_STRING, _BYTES, _OTHER}:
            raise _Bail  # celpy iterates strings and bytes: `'a' in 'cat'` holds
        raise _mismatch("in", item, container)
    if isinstance(result, CELEvalError):
        raise _CelError(_describe_error(result))
    return result


def _is_double_pair(a: Any, b: Any) -> bool:
    # The lenient promotion of environment._FUNCTIONS: one double operand makes the operation a double one.
    kind_a, kind_b = type(a), type(b)
    return (kind_a in _DOUBLE_TYPES and kind_b in _NUMBER_TYPES) or (kind_b in _DOUBLE_TYPES
                                                                     and kind_a in _NUMBER_TYPES)


def _temporal(compute: _Binary, a: Any, b: Any) -> Any:
    # Timestamps and durations are celpy's own types here, so their operators are celpy's.
    try:
        return compute(a, b)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _CelError(f"timestamp or duration out of range: {_describe_error(exc)}") from None


def _between(a: Any, b: Any) -> Any:
    """timestamp - timestamp: DurationType(a - b) without its Python-level constructor.

    Its range check is left out: timestamps (years 1 to 9999) are never further apart than a duration's
    range (10000 years).
    """
    delta = _dt_sub(a, b)
    return _td_new(_DurationType, delta.days, delta.seconds, delta.microseconds)


def _add(a: Any, b: Any) -> Any:
    if type(a) is float and type(b) is float:
        return a + b
    if _is_double_pair(a, b):
        return float(a) + float(b)
    ka, kb = _kind(a), _kind(b)
    if ka == kb == _INT:
        return _int(int(a) + int(b))
    if ka == kb == _UINT:
        return _uint(int(a) + int(b))
    if ka == kb == _STRING:
        return _PlainStr(a + b)
    if (ka, kb) in {(_TIMESTAMP, _DURATION), (_DURATION, _TIMESTAMP), (_DURATION, _DURATION)}:
        return _temporal(operator.add, a, b)
    if {ka, kb} & {_NULL, _MAP} or ({ka, kb} & _NUMERIC and {ka, kb} & {_STRING, _LIST}):
        raise _mismatch("+", a, b)
    raise _Bail  # list concatenation, bools as numbers, bytes: celpy's own results


def _sub(a: Any, b: Any) -> Any:
    kind_a = type(a)
    if kind_a is type(b):
        if kind_a is float:
            return a - b
        if kind_a is _TimestampType:
            return _between(a, b)
    if _is_double_pair(a, b):
        return float(a) - float(b)
    ka, kb = _kind(a), _kind(b)
    if ka == kb == _INT:
        return _int(int(a) - int(b))
    if ka == kb == _UINT:
        return _uint(int(a) - int(b))
    if ka == kb == _TIMESTAMP:
        return _between(a, b)
    if ka in (_TIMESTAMP, _DURATION) and kb == _DURATION:
        return _temporal(operator.sub, a, b)
    if {ka, kb} & {_NULL, _MAP, _STRING, _LIST, _BYTES}:
        raise _mismatch("-", a, b)
    raise _Bail


def _mul(a: Any, b: Any) -> Any:
    if type(a) is float and type(b) is float:
        return a * b
    if _is_double_pair(a, b):
        return float(a) * float(b)
    ka, kb = _kind(a), _kind(b)
    if ka == kb == _INT:
        return _int(int(a) * int(b))
    if ka == kb == _UINT:
        return _uint(int(a) * int(b))
    if {ka, kb} & {_NULL, _MAP}:
        raise _mismatch("*", a, b)
    raise _Bail  # strings, lists, bools, durations: celpy's operator overloads decide, quirks and all


def _div(a: Any, b: Any) -> Any:
    if type(a) is float and type(b) is float:
        return _float_div(a, b)
    if _is_double_pair(a, b):
        return _float_div(float(a), float(b))
    ka, kb = _kind(a), _kind(b)
    if ka == kb == _INT or ka == kb == _UINT:
        x, y = int(a), int(b)
        if y == 0:
            raise _CelError("division by zero")
        if ka == _UINT:
            return _uint(x // y)
        return _int((-1 if (x < 0) != (y < 0) else 1) * (abs(x) // abs(y)))  # truncated, as celpy's IntType
    if kb == _DOUBLE and ka in _NOT_ARITHMETIC:
        raise _Bail  # celpy's DoubleType answers `null / 0.0` with infinity
    if ka in _NOT_ARITHMETIC or kb in _NOT_ARITHMETIC:
        raise _mismatch("/", a, b)
    raise _Bail


def _mod(a: Any, b: Any) -> Any:
    ka, kb = _kind(a), _kind(b)
    if ka == kb == _INT or ka == kb == _UINT:
        x, y = int(a), int(b)
        if y == 0:
            raise _CelError("modulus by zero")
        if ka == _UINT:
            return _uint(x % y)
        return _int((-1 if x < 0 else 1) * (abs(x) % abs(y)))  # the sign of the dividend, as celpy's IntType
    if ka == _DOUBLE:
        raise _mismatch("%", a, b)  # no `%` on doubles: use int(data.n) % 2
    if ka in (_STRING, _BYTES):
        raise _Bail  # Python's %-formatting, in celpy
    if {ka, kb} & {_NULL, _LIST, _MAP}:
        raise _mismatch("%", a, b)
    raise _Bail


def _neg(a: Any) -> Any:
    kind = type(a)
    if kind is float or kind is celtypes.DoubleType:
        return -float(a)
    if kind is _IntType:
        return _int(-int(a))
    if _kind(a) in {_DURATION, _OTHER}:
        raise _Bail  # celpy negates a duration into a bare timedelta
    raise _mismatch("-()", a)


def _not(a: Any) -> bool:
    kind = type(a)
    if kind is bool or kind is _BoolType:
        return not a
    raise _mismatch("!()", a)


def _select(value: Any, name: str, where: str | None = None) -> Any:
    """`value.name`: a map's field, celpy's way (every other kind is an error).

    `where` is the field's path in the rule (`last.price`), named in the error when there is one.
    """
    kind = type(value)
    if kind is dict:
        try:
            return _lazy(value[name])
        except KeyError:
            raise _missing_field(name, where) from None
    if isinstance(value, _MapType):
        try:
            return value[name]
        except KeyError:
            raise _missing_field(name, where) from None
    if kind is CELEvalError:
        raise _variable_error(value)
    if where is not None:
        parent = where.rpartition(".")[0]
        raise _CelError(f"cannot read {where}: {parent} is {_kind_name(value)}, which has no fields")
    raise _CelError(f"{_kind_name(value)} does not support field selection (.{name})")


def _missing_field(name: str, where: str | None) -> _CelError:
    return _CelError(f"missing field {name!r}" + (f" (cannot read {where})" if where is not None else ""))


def _index(container: Any, key: Any) -> Any:
    kind = type(container)
    if kind is dict:
        if _kind(key) == _STRING:
            try:
                return _lazy(container[key])
            except KeyError:
                pass
        raise _CelError(f"no such key {_quote(key)}")  # JSON keys are strings: others are missing or invalid
    if kind is list or kind is _ListType:
        key_kind = type(key)
        if key_kind is _IntType or key_kind is _UintType:
            try:
                item = container[key]  # a negative index counts from the end, in celpy too
            except IndexError:
                raise _CelError(f"index {key} out of range") from None
            return _lazy(item) if kind is list else item
        if _kind(key) in {_BOOL, _OTHER}:
            raise _Bail
        raise _mismatch("[]", container, key)
    if isinstance(container, _MapType):
        if _kind(key) == _STRING:
            try:
                return container[key]
            except KeyError:
                raise _CelError(f"no such key {_quote(key)}") from None
        raise _Bail
    if _kind(container) in {_STRING, _BYTES, _OTHER}:
        raise _Bail  # celpy indexes strings and bytes as Python does
    raise _mismatch("[]", container, key)


def _size(value: Any) -> Any:
    if value is None:
        return _int_new(_IntType, 0)  # celpy's answer
    kind = _kind(value)
    if kind in {_STRING, _BYTES, _LIST, _MAP}:
        return _int_new(_IntType, len(value))
    if kind == _OTHER:
        raise _Bail
    raise _mismatch("size()", value)


def _string_method(name: str, test: Callable[[str, str], bool]) -> Callable[[Any, Any], Any]:
    def method(text: Any, fragment: Any) -> bool:
        kind = _kind(text)
        if kind == _STRING and _kind(fragment) == _STRING:
            return test(text, fragment)
        if kind in {_BYTES, _OTHER}:
            raise _Bail
        raise _mismatch(f"{name}()", text, fragment)

    return method


_starts_with = _string_method("startsWith", str.startswith)
_ends_with = _string_method("endsWith", str.endswith)


def _contains(container: Any, item: Any) -> Any:
    kind = _kind(container)
    if kind == _STRING and type(container) is not _PlainStr:
        if _kind(item) == _STRING:
            return item in container
        raise _mismatch("contains()", container, item)
    if kind in {_BYTES, _LIST, _MAP, _OTHER}:
        raise _Bail
    raise _mismatch("contains()", container, item)  # also a string made by `+`: see _PlainStr


def _matches(text: Any, pattern: Any) -> bool:
    """`text.matches(pattern)` as celpy's function_matches: an RE2 search (a partial match)."""
    try:
        return re2.search(pattern, text) is not None
    except re2.error as exc:
        raise _CelError(f"invalid regular expression {pattern!r}: {_describe_error(exc)}") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise _CelError(f"matches(): {_describe_error(exc)}") from None


_NULL_SPAN: Final = (-1, -1)


def _searcher(regexp: Any) -> Callable[[str], bool]:
    """A compiled RE2 pattern's search as a bool, skipping the wrapper's span decoding where possible."""
    try:
        match, anchor = regexp._regexp.Match, re2._re2.RE2.Anchor.UNANCHORED
    except AttributeError:  # another google-re2 layout: its public API is only slower
        return lambda text: regexp.search(text) is not None

    def search(text: str) -> bool:
        data = text.encode("utf-8")
        return bool(match(anchor, data, 0, len(data))[0] != _NULL_SPAN)

    return search


def _abs(value: Any) -> Any:
    kind = type(value)
    if kind in _DOUBLE_TYPES:
        return abs(float(value))
    if kind is _IntType:
        return _int(abs(int(value)))
    if kind is _UintType:
        return value
    raise _mismatch("abs()", value)


# RFC 3339 as producers write it; pendulum reads anything else (and these too, only 50x slower).
_RFC3339: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)


def _timestamp_of(text: Any) -> Any:
    """timestamp(text), the value celpy's TimestampType (through pendulum) gives."""
    if _kind(text) == _STRING:
        if _RFC3339.fullmatch(text) is not None:
            # Within this format fromisoformat reads what pendulum reads, fraction truncated to µs alike.
            try:
                return _as_timestamp(dt.datetime.fromisoformat(text))
            except ValueError:
                pass  # such as February 30th: pendulum's verdict, below
        try:
            parsed = _TimestampType(text)
        except (ValueError, TypeError, AttributeError) as exc:
            raise _CelError(f"cannot parse timestamp {text!r}: {_describe_error(exc)}") from None
        if not _sound(parsed):
            raise _Bail
        return parsed
    return _call(_TimestampType, text)


def _sound(moment: Any) -> bool:
    """Whether a timestamp has a usable UTC offset.

    pendulum accepts offsets of 24 hours and more, which datetime refuses only when the offset is used:
    comparing such a timestamp then raises out of celpy (a crash, which even `true || ...` reports).
    """
    try:
        moment.utcoffset()
    except ValueError:
        return False
    return True


def _string_of(value: Any) -> Any:
    if _kind(value) in {_LIST, _MAP, _OTHER}:
        raise _Bail  # celpy spells containers out with its reprs
    return _call(celtypes.StringType, value)
