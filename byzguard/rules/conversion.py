"""Event values as CEL values: parsed JSON, the envelope attributes and `now` converted for celpy.

Also what the fast paths need to skip that conversion: whether a value is plain JSON they may read as it is,
and CEL timestamps built cheaply.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, Final

from celpy import celtypes
from celpy.evaluation import Activation, CELEvalError

from byzguard.rules.environment import _FUNCTIONS, _MATH
from byzguard.rules.wording import _describe_error

_ENVELOPE_KEYS: Final = ("id", "source", "type", "subject", "time", "version")

_TimestampType = celtypes.TimestampType


# --- conversion of inputs to CEL values ---------------------------------------------------------------


# celpy's constructors re-validate and, for IntType, build a decorator per call; the values here are
# already checked, so the base types' constructors are called directly (3-5x cheaper per value).
_str_new = str.__new__
_float_new = float.__new__
_int_new = int.__new__
_S = celtypes.StringType
_D = celtypes.DoubleType


def _map(pairs: Any) -> celtypes.MapType:
    result = celtypes.MapType()
    dict.update(result, pairs)  # MapType's own __init__ runs a slow typing.Sequence isinstance check
    return result


# Containers nested deeper than this are converted with a stack of their own (see _to_cel_deep) ...
_RECURSIVE_LEVELS: Final = 64
# ... and no deeper than orjson parses: so JSON that orjson parsed always converts, whatever the call stack.
_MAX_LEVELS: Final = 1024


def _to_cel(value: Any, depth: int = 0) -> Any:
    """Convert parsed JSON (dict/list/str/number/bool/None) to CEL values; every number becomes a double.

    `depth` is how many containers enclose value; containers nested 1,024 deep or more are refused.
    """
    kind = type(value)
    # Exact-type checks first: orjson and json hand us exactly these types, and `type is` is cheapest.
    if kind is str:
        return _str_new(_S, value)
    if kind is float or kind is int:
        return _float_new(_D, value)  # a huge int raises OverflowError: reported as a rule error
    if kind is dict:
        if depth >= _RECURSIVE_LEVELS:
            return _to_cel_deep(value, depth)
        return _map({_key_to_cel(k): _to_cel(v, depth + 1) for k, v in value.items()})
    if value is None:
        return None
    if kind is bool:
        return _int_new(celtypes.BoolType, value)
    if kind is list:
        if depth >= _RECURSIVE_LEVELS:
            return _to_cel_deep(value, depth)
        return celtypes.ListType([_to_cel(v, depth + 1) for v in value])
    # Slow path: subclasses and other containers.
    if isinstance(value, str):
        return _str_new(_S, value)
    if isinstance(value, bool):
        return _int_new(celtypes.BoolType, value)
    if isinstance(value, int | float):
        return _float_new(_D, value)
    if isinstance(value, Mapping):
        if depth >= _RECURSIVE_LEVELS:
            return _to_cel_deep(value, depth)
        return _map({_key_to_cel(k): _to_cel(v, depth + 1) for k, v in value.items()})
    if isinstance(value, list | tuple):
        if depth >= _RECURSIVE_LEVELS:
            return _to_cel_deep(value, depth)
        return celtypes.ListType([_to_cel(v, depth + 1) for v in value])
    raise TypeError(f"cannot use a {kind.__name__} in a rule")


_LEAF, _MAPPING, _SEQUENCE = range(3)


def _container(value: Any) -> int:
    """Whether _to_cel converts value as a mapping, as a sequence, or as a leaf (which may fail)."""
    kind = type(value)
    if kind is dict:
        return _MAPPING
    if kind is list:
        return _SEQUENCE
    if kind is str or kind is float or kind is int or kind is bool or value is None or isinstance(
            value, str | int | float):
        return _LEAF
    if isinstance(value, Mapping):
        return _MAPPING
    if isinstance(value, list | tuple):
        return _SEQUENCE
    return _LEAF


def _to_cel_deep(value: Any, depth: int) -> Any:
    """_to_cel of a container `depth` levels down, item by item in the same order, on a stack of its own."""
    # One frame per open container: [is a mapping, its items left, items converted, the key being converted].
    stack: list[list[Any]] = []

    def open_container(container: Any, level: int) -> None:
        if level >= _MAX_LEVELS:
            raise ValueError(f"nested deeper than {_MAX_LEVELS} levels")
        is_map = _container(container) == _MAPPING
        stack.append([is_map, iter(container.items() if is_map else container), {} if is_map else [], None])

    open_container(value, depth)
    while True:
        frame = stack[-1]
        is_map, items, done = frame[0], frame[1], frame[2]
        for item in items:
            if is_map:
                key, child = _key_to_cel(item[0]), item[1]
            else:
                key, child = None, item
            if _container(child) != _LEAF:
                frame[3] = key
                open_container(child, depth + len(stack))
                break
            if is_map:
                done[key] = _to_cel(child)
            else:
                done.append(_to_cel(child))
        else:
            stack.pop()
            result = _map(done) if is_map else celtypes.ListType(done)
            if not stack:
                return result
            parent = stack[-1]
            if parent[0]:
                parent[2][parent[3]] = result
            else:
                parent[2].append(result)


def _key_to_cel(key: Any) -> Any:
    if type(key) is str or isinstance(key, str):
        return _str_new(_S, key)
    if isinstance(key, bool):
        return _int_new(celtypes.BoolType, key)
    if isinstance(key, int) and -(2**63) <= key < 2**63:
        return _int_new(celtypes.IntType, key)
    raise TypeError(f"cannot use {key!r} as a map key in a rule")


def _timestamp(value: Any) -> Any:
    """An envelope time (epoch seconds, datetime or RFC 3339 text) as a CEL timestamp, or null."""
    try:
        if value is None or isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            return celtypes.TimestampType.fromtimestamp(value, dt.UTC)
        if isinstance(value, dt.datetime | str):
            return celtypes.TimestampType(value)
    except Exception:
        # The time check judges malformed times; here an unusable time is simply unknown.
        return None
    return None


def _version(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return _int_new(celtypes.IntType, value)
    return None


_EVENT_KEYS: Final = {key: _str_new(_S, key) for key in _ENVELOPE_KEYS}
_TIME_KEY: Final = _EVENT_KEYS["time"]
_VERSION_KEY: Final = _EVENT_KEYS["version"]


def _event_to_cel(event: Mapping[str, Any]) -> celtypes.MapType:
    fields: dict[Any, Any] = dict.fromkeys(_EVENT_KEYS.values())
    for key, value in event.items():
        if key == "time":
            fields[_TIME_KEY] = _timestamp(value)
        elif key == "version":
            fields[_VERSION_KEY] = _version(value)
        elif isinstance(key, str) and type(value) is int and -(2**63) <= value < 2**63:
            fields[_str_new(_S, key)] = _int_new(celtypes.IntType, value)  # counters such as lamport
        elif isinstance(key, str):
            try:
                fields[_str_new(_S, key)] = _to_cel(value)
            except Exception:  # e.g. a raw bytes header: the envelope is not the rules' subject, skip it
                continue
    return _map(fields)


def _convert(name: str, convert: Callable[[Any], Any], value: Any) -> Any:
    # A value CEL can't hold becomes an error value: only the rules that touch it fail, and
    # `||`/`&&` short-circuit around it as CEL's commutative error semantics say.
    try:
        return convert(value)
    except Exception as exc:
        return CELEvalError(f"cannot use {name} in rules: {_describe_error(exc)}")


def _activation(
    roots: frozenset[str], data: Any, last: Any, now: float, event: Mapping[str, Any],
    converted: Mapping[str, Any] | None = None,
) -> Activation:
    """One activation per event, shared by every rule, binding only the variables the rules use.

    `converted` holds the values the fast path already converted for this event, reused rather than redone.
    """
    done = converted or {}
    bound: dict[str, Any] = {"math": _MATH}
    if "data" in roots:
        bound["data"] = done["data"] if "data" in done else _convert("data", _to_cel, data)
    if "last" in roots:
        bound["last"] = done["last"] if "last" in done else _convert("last", _to_cel, last)
    if "has_last" in roots:
        bound["has_last"] = _int_new(celtypes.BoolType, last is not None)
    if "now" in roots:
        bound["now"] = _convert("now", _now, now)
    if "event" in roots:
        bound["event"] = done["event"] if "event" in done else _convert("event", _event_to_cel, event)
    return Activation(vars=bound, functions=_FUNCTIONS)


def _now(now: float) -> celtypes.TimestampType:
    return celtypes.TimestampType.fromtimestamp(now, dt.UTC)


# --- the fast path: values of the event -----------------------------------------------------------------

_PLAIN_DEPTH: Final = 32
_PLAIN_SCALARS: Final = frozenset({str, float, bool, type(None)})
# float(n) overflows from here on (halfway between the largest double and 2**1024 rounds up).
_FLOAT_INT_END: Final = 2**1024 - 2**970


def _plain_json(value: Any, depth: int = 0) -> bool:
    """Whether `_to_cel` converts value without fail and the fast path may read it as it is.

    Deeper or unusual values are converted instead: reading those stays exact, only slower.
    """
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if kind is int:
        return bool(-_FLOAT_INT_END < value < _FLOAT_INT_END)
    if depth >= _PLAIN_DEPTH:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            item_kind = type(item)
            if item_kind in _PLAIN_SCALARS:
                continue
            if item_kind is int:  # inline: a JSON object's integers would otherwise cost a call each
                if not -_FLOAT_INT_END < item < _FLOAT_INT_END:
                    return False
            elif not _plain_json(item, depth + 1):
                return False
        return True
    if kind is list:
        return all(type(item) in _PLAIN_SCALARS or _plain_json(item, depth + 1) for item in value)
    return False


_UTC: Final = dt.UTC
_dt_new = dt.datetime.__new__
_dt_sub = dt.datetime.__sub__
_td_new = dt.timedelta.__new__


def _as_timestamp(moment: dt.datetime) -> Any:
    # TimestampType(moment) without its Python-level constructor: datetime's own pickle state rebuilds
    # the very same fields and zone in one C call.
    return _dt_new(_TimestampType, *moment.__reduce__()[1])


def _fast_now(now: float) -> Any:
    """The value `_now` gives, a few times faster."""
    return _as_timestamp(dt.datetime.fromtimestamp(now, _UTC))
