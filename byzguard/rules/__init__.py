"""Domain invariant rules: declarative CEL expressions per event type, evaluated without Python eval.

A rule says what must be true of an event for it to be plausible, in CEL (the Common Expression
Language, as Confluent data contracts use), e.g. the seed article's price invariants::

    data.price > 0
    data.currency.matches("^[A-Z]{3}$")
    last == null || abs(data.price - last.price) / last.price < 0.5
    now - timestamp(data.lastUpdated) < duration("24h")

Variables an expression can use:

- ``data``: the event's parsed JSON data (map, list or scalar).
- ``last``: the entity's last-known-good data, or ``null`` when there is none.
- ``has_last``: ``last != null``, as a bool.
- ``now``: the current time, a CEL timestamp.
- ``event``: envelope attributes: ``id``, ``source``, ``type``, ``subject`` (strings or null),
  ``time`` (timestamp or null) and ``version`` (int or null), plus any other attribute given
  (such as ``lamport``, an int).

Numbers. JSON has a single number type and the seed's producers are TypeScript, where every number is a
double; CEL's own JSON mapping (google.protobuf.Value) agrees. So every JSON number in ``data`` and ``last``
is a CEL double, whether it was written ``50`` or ``49.99``: ``data.price - last.price`` never trips over
int-versus-double. Int literals in rules mix freely with those doubles: comparisons and equality across
int, uint and double compare numeric values (as the CEL spec's heterogeneous equality and cross-type
comparisons do), and, as a deliberate leniency beyond strict CEL, ``+ - * /`` with one double operand
promote the other to double, so ``data.price > 0`` and ``data.price * 2 < last.price`` both work.
Equality between values of different kinds is ``false`` rather than an error, so ``data.x == null`` is
safe on any present field (a missing one is an error: test it with ``has(data.x)``). Use ``int(data.n)``
for integer arithmetic such as ``%``; use strings for ids beyond 2^53.

Extra functions: ``abs(x)`` (also spelled ``math.abs(x)`` as in cel-go's math extension).

Evaluation never raises: a rule that is false yields ``invariant.violated``; one that errors (missing field,
type mismatch, unparsable timestamp, a value CEL can't hold such as an integer beyond double range) or
returns a non-bool yields ``invariant.error``, both with the rule's severity. A rule that does not parse,
or names an unknown variable or function, is refused at start with ``RuleCompileError``.

Cost: an empty RuleSet returns at once, and only the variables some rule uses are prepared. celpy walks
a rule's parse tree on every evaluation (0.1-0.6 ms a rule), so at compile time each rule written in the
common subset of CEL (literals, the five variables, field selection and indexing, ``has``, ``! -``,
arithmetic, comparisons, ``&& || ?:``, ``in``, list and constant map literals, ``size matches startsWith
endsWith contains abs int double string timestamp duration``) is also compiled into nested Python
closures that compute what celpy would, reading the event's JSON as parsed: a few µs a rule. Rules outside
that subset (macros such as ``all()``, ``type()``, map literals with computed values...) are evaluated by
celpy, as is any event the closures can't decide (such as ``true + 1``, which celpy computes its own way),
so both paths give the same outcomes; differential tests keep them honest. ``RuleSet.compiled_fast`` names
the rules on the fast path.

On top of the closures, the rules of one event type are translated once, from the configuration only, into
the source of one Python function (compiled with ``compile()``) for their expected case: type-guarded reads
of plain JSON numbers, strings, timestamps. It decides every rule that holds in well under a µs each; a rule
it cannot show true (a failed guard, a violation, an error) goes to the closures, which decide and word
it. ``RuleSet.generated`` names the rules in that function. Its source holds no constant and no event
value: constants, field names and patterns are bound as names.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import celpy
import lark
import re2  # type: ignore[import-untyped]  # celpy's own regex engine: `matches` is RE2
from celpy import celtypes
from celpy.celparser import CELParseError
from celpy.evaluation import Activation, CELEvalError, Evaluator, base_functions, operator_in

from byzguard.errors import RuleCompileError
from byzguard.verdict import Code, Reason, Severity

__all__ = ["VARIABLES", "RuleSet", "RuleSpec", "compile_rules"]

#: Top-level names a rule may refer to.
VARIABLES: Final = frozenset({"data", "last", "has_last", "now", "event"})

# Roots whose `a.b.c` paths are quoted back, with their values, in a violation's detail.
_QUOTED_ROOTS: Final = frozenset({"data", "last", "event"})
_ENVELOPE_KEYS: Final = ("id", "source", "type", "subject", "time", "version")
_MACROS: Final = frozenset({"map", "filter", "all", "exists", "exists_one", "reduce", "min"})
_FUNCTION_MACROS: Final = frozenset({"has", "dyn"})
# Type names are values in CEL (`type(x) == double`); celpy resolves them through its function table.
_TYPE_NAMES: Final = frozenset(
    {"bool", "bytes", "double", "duration", "int", "list", "map", "null_type", "string", "timestamp",
     "type", "uint"}
)
_DETAIL_VALUES: Final = 4
_DETAIL_VALUE_CHARS: Final = 60
_ERROR_CHARS: Final = 300


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One invariant as configured: a name, a CEL expression that must be true, its severity, a message."""

    name: str
    expr: str
    severity: Severity = Severity.REJECT
    message: str = ""


# --- numbers: heterogeneous comparison, equality and (lenient) arithmetic -----------------------------

_NUMBER_TYPES: Final = frozenset({celtypes.IntType, celtypes.UintType, celtypes.DoubleType, int, float})
_DOUBLE_TYPES: Final = frozenset({celtypes.DoubleType, float})
_BOOL_TYPES: Final = (bool, celtypes.BoolType)
_CONTAINERS: Final = (celtypes.ListType, celtypes.MapType)

_Binary = Callable[[Any, Any], Any]


def _plain(x: Any) -> int | float:
    # Python compares int with float exactly, which is what cross-type numeric comparison needs.
    return float(x) if type(x) in _DOUBLE_TYPES else int(x)


def _equal(a: Any, b: Any) -> bool:
    """CEL heterogeneous equality: numbers by value, containers deeply, different kinds never equal."""
    if a is None or b is None:
        return a is b
    ta, tb = type(a), type(b)
    if ta in _NUMBER_TYPES and tb in _NUMBER_TYPES:
        return _plain(a) == _plain(b)
    if isinstance(a, _BOOL_TYPES) or isinstance(b, _BOOL_TYPES):
        # celpy's BoolType is an int, so `true == 1` would otherwise hold.
        return isinstance(a, _BOOL_TYPES) and isinstance(b, _BOOL_TYPES) and bool(a) == bool(b)
    if isinstance(a, celtypes.ListType) and isinstance(b, celtypes.ListType):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, celtypes.MapType) and isinstance(b, celtypes.MapType):
        try:
            same_keys = a.keys() == b.keys()
        except TypeError:  # IntType and BoolType keys refuse to compare with each other
            return False
        return same_keys and all(_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, _CONTAINERS) or isinstance(b, _CONTAINERS):
        return False
    try:
        return bool(a == b)
    except TypeError:
        return False


def _cel_eq(a: Any, b: Any) -> Any:
    if isinstance(a, CELEvalError):
        return a
    if isinstance(b, CELEvalError):
        return b
    return celtypes.BoolType(_equal(a, b))


def _cel_ne(a: Any, b: Any) -> Any:
    if isinstance(a, CELEvalError):
        return a
    if isinstance(b, CELEvalError):
        return b
    return celtypes.BoolType(not _equal(a, b))


def _cel_in(item: Any, container: Any) -> Any:
    if isinstance(item, CELEvalError):
        return item
    if isinstance(container, CELEvalError):
        return container
    if isinstance(container, celtypes.ListType):
        return celtypes.BoolType(any(_equal(item, element) for element in container))
    if isinstance(container, celtypes.MapType) and type(item) in _NUMBER_TYPES:
        # JSON map keys are strings, and CEL map keys can't be doubles: compare numerically anyway.
        return celtypes.BoolType(any(_equal(item, key) for key in container))
    return operator_in(item, container)


def _ordering(compare: _Binary, base: Any) -> _Binary:
    def cel_compare(a: Any, b: Any) -> Any:
        ta, tb = type(a), type(b)
        if ta is not tb and ta in _NUMBER_TYPES and tb in _NUMBER_TYPES:
            return celtypes.BoolType(compare(_plain(a), _plain(b)))
        return base(a, b)

    return cel_compare


def _float_div(x: float, y: float) -> float:
    # IEEE 754 division; celpy's DoubleType answers +inf for 0/0 and for -1/0.
    if y == 0.0:
        if x == 0.0 or math.isnan(x):
            return math.nan
        return math.copysign(math.inf, x) * math.copysign(1.0, y)
    return x / y


def _arithmetic(compute: Callable[[float, float], float], base: Any) -> _Binary:
    def cel_arithmetic(a: Any, b: Any) -> Any:
        ta, tb = type(a), type(b)
        if (ta in _DOUBLE_TYPES and tb in _NUMBER_TYPES) or (tb in _DOUBLE_TYPES and ta in _NUMBER_TYPES):
            # Both doubles too: celpy would hand back a bare float, which `type()` does not know.
            return celtypes.DoubleType(compute(float(a), float(b)))
        return base(a, b)

    return cel_arithmetic


class _MathNamespace(celtypes.MapType):
    """The value bound to `math`, so that `math.abs(x)` reaches the `abs` function."""


_MATH: Final = _MathNamespace()


def _cel_abs(*args: Any) -> Any:
    if len(args) == 2 and args[0] is _MATH:
        args = args[1:]
    if len(args) != 1:
        raise TypeError("abs() takes exactly one number")
    (x,) = args
    if isinstance(x, CELEvalError):
        return x
    kind = type(x)
    if kind in _DOUBLE_TYPES:
        return celtypes.DoubleType(abs(x))
    if kind is celtypes.IntType:
        return celtypes.IntType(abs(int(x)))  # abs(-2**63) overflows int64: celpy reports it as an error
    if kind is celtypes.UintType:
        return x
    raise TypeError(f"abs() of {_cel_type_name(x)}")


_base = base_functions
_FUNCTIONS: Final[dict[str, Any]] = {
    "_==_": _cel_eq,
    "_!=_": _cel_ne,
    "_in_": _cel_in,
    "_<_": _ordering(operator.lt, _base["_<_"]),
    "_<=_": _ordering(operator.le, _base["_<=_"]),
    "_>_": _ordering(operator.gt, _base["_>_"]),
    "_>=_": _ordering(operator.ge, _base["_>=_"]),
    "_+_": _arithmetic(operator.add, _base["_+_"]),
    "_-_": _arithmetic(operator.sub, _base["_-_"]),
    "_*_": _arithmetic(operator.mul, _base["_*_"]),
    "_/_": _arithmetic(_float_div, _base["_/_"]),
    "abs": _cel_abs,
}
# Names usable in call position (`f(x)`, `x.f()`); operators like `_+_` can't be spelled that way anyway.
_KNOWN_FUNCTIONS: Final = frozenset(name for name in (*_base, *_FUNCTIONS) if not name.startswith("_"))


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


def _to_cel(value: Any) -> Any:
    """Convert parsed JSON (dict/list/str/number/bool/None) to CEL values; every number becomes a double."""
    kind = type(value)
    # Exact-type checks first: orjson and json hand us exactly these types, and `type is` is cheapest.
    if kind is str:
        return _str_new(_S, value)
    if kind is float or kind is int:
        return _float_new(_D, value)  # a huge int raises OverflowError: reported as a rule error
    if kind is dict:
        return _map({_key_to_cel(k): _to_cel(v) for k, v in value.items()})
    if value is None:
        return None
    if kind is bool:
        return _int_new(celtypes.BoolType, value)
    if kind is list:
        return celtypes.ListType([_to_cel(v) for v in value])
    # Slow path: subclasses and other containers.
    if isinstance(value, str):
        return _str_new(_S, value)
    if isinstance(value, bool):
        return _int_new(celtypes.BoolType, value)
    if isinstance(value, int | float):
        return _float_new(_D, value)
    if isinstance(value, Mapping):
        return _map({_key_to_cel(k): _to_cel(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return celtypes.ListType([_to_cel(v) for v in value])
    raise TypeError(f"cannot use a {kind.__name__} in a rule")


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


# --- reporting ----------------------------------------------------------------------------------------

_CLASS_RE: Final = re.compile(r"<class '(?:celpy\.celtypes\.)?(\w+?)(?:Type)?'>")
_TOKEN_RE: Final = re.compile(r"Token\('RULE', '(\w+)'\)")
_ACTIVATION_RE: Final = re.compile(r" \(in activation .*", re.DOTALL)
_GENERIC_ERRORS: Final = frozenset(
    {"return error for overflow", "no such overload", "evaluation error", "invalid_argument",
     "modulus or divide by zero"}
)


def _cel_type_name(value: Any) -> str:
    if value is None:
        return "null"
    name = type(value).__name__
    return {"float": "double", "str": "string"}.get(name, name.removesuffix("Type").lower())


def _describe_error(exc: BaseException) -> str:
    """A one-line, bounded account of a CEL evaluation error, without celpy's internals."""
    if isinstance(exc, CELEvalError) and exc.args:
        text = str(exc.args[0])
        inner = exc.args[2] if len(exc.args) > 2 else None
        # celpy's generic messages hide the useful part (e.g. the unparsable timestamp) in the cause.
        if text in _GENERIC_ERRORS and isinstance(inner, tuple) and inner:
            text = f"{text}: {inner[0]}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = _ACTIVATION_RE.sub("", text)
    text = _CLASS_RE.sub(lambda m: m.group(1).lower(), text)
    text = _TOKEN_RE.sub(r"\1", text)
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 1] + "…"


def _format_value(value: Any) -> str | None:
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float | str):
        text = repr(value)
    else:
        return None  # containers are not "simple": quoting them would flood the detail
    return text if len(text) <= _DETAIL_VALUE_CHARS else text[: _DETAIL_VALUE_CHARS - 1] + "…"


def _lookup(root: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    value = root
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return False, None
        value = value[key]
    return True, value


# --- the fast path: rules compiled once into closures ---------------------------------------------------
#
# Each closure takes the event's variables (a tuple, see _SLOTS) and computes what celpy computes for its
# node, on the same values, with one representation difference made for speed: `data` and `last`, once
# checked to be plain JSON that `_to_cel` would convert without fail, are read as parsed (dict, list, str,
# float, int, bool, None); a number read out of them becomes a float, as `_to_cel` makes every JSON number
# a double, and a dict or list is converted whole (with `_to_cel`) before anything but a lookup uses it.
# Elsewhere plain float, str and bool stand for DoubleType, StringType and BoolType.
#
# A CEL error value is a raised _CelError, which `&&`, `||` and has() absorb as celpy does. Where the
# closures can't be sure what celpy does (celpy has quirks such as `true + 1 == 2` or `null / 0.0`), they
# raise _Bail and celpy evaluates the rule for that event: the fast path is an optimisation, never a
# second opinion.

_Env = tuple[Any, ...]
_Fn = Callable[[_Env], Any]

_SLOTS: Final = {"data": 0, "last": 1, "has_last": 2, "now": 3, "event": 4}
_NO_ENV: Final[_Env] = (None, None, False, None, None)


class _CelError(Exception):
    """A CEL error value: the rule's outcome is invariant.error unless `&&`, `||` or has() absorbs it."""


class _Bail(Exception):
    """The fast path can't tell what celpy would make of this: celpy evaluates the rule for this event."""


class _Unsupported(Exception):
    """A construct outside the fast subset: the rule is always evaluated by celpy."""


class _PlainStr(str):
    """A string made by `+`: celpy makes a plain `str` there, which (unlike StringType) has no contains()."""

    __slots__ = ()


_IntType = celtypes.IntType
_UintType = celtypes.UintType
_BoolType = celtypes.BoolType
_ListType = celtypes.ListType
_MapType = celtypes.MapType
_TimestampType = celtypes.TimestampType
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


def _fast_input(name: str, value: Any, converted: dict[str, Any]) -> Any:
    if _plain_json(value):
        return value
    # Converted once and shared with celpy's activation, so both paths see the very same failure, if any.
    converted[name] = result = _convert(name, _to_cel, value)
    return result


def _fast_env(roots: frozenset[str], data: Any, last: Any, now: float, event: Mapping[str, Any],
              converted: dict[str, Any]) -> _Env:
    """The variables of one event for the fast path, in _SLOTS order; unused ones are None."""
    fast_data = _fast_input("data", data, converted) if "data" in roots else None
    fast_last = _fast_input("last", last, converted) if "last" in roots else None
    fast_now = _convert("now", _fast_now, now) if "now" in roots else None
    fast_event = None
    if "event" in roots:
        converted["event"] = fast_event = _convert("event", _event_to_cel, event)
        time = dict.get(fast_event, _TIME_KEY) if type(fast_event) is _MapType else None
        if time is not None and not _sound(time):
            raise _Bail  # celpy evaluates every rule of this event: see _sound
    return (fast_data, fast_last, last is not None, fast_now, fast_event)


def _variable_error(value: CELEvalError) -> _CelError:
    return _CelError(_describe_error(value))


# --- the fast path: operators ------------------------------------------------------------------------------
#
# Each takes operand values and returns the result or raises _CelError/_Bail. The type combinations
# handled here, and the ones declared errors, mirror what celpy does with rules.py's _FUNCTIONS; the kind
# matrix test in tests/unit/test_rules.py checks every pair of kinds against celpy.


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
    # rules.py's lenient promotion: one double operand makes the operation a double one.
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


# --- the fast path: compiling closures ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Code:
    """A compiled node: its closure, whether it is a constant (and which), whether it may crash.

    celpy lets a few Python exceptions escape instead of making error values of them (int() of an
    infinite double raises OverflowError), and evaluates both sides of `&&` and `||`: where such a crash
    may hide in a branch the closures would skip, they evaluate the branch anyway.
    """

    fn: _Fn
    crash: bool = False
    const: bool = False
    value: Any = None


def _const(value: Any) -> _Code:
    def constant(env: _Env) -> Any:
        return value

    return _Code(constant, const=True, value=value)


def _drain(fn: _Fn, env: _Env) -> None:
    # Evaluated only for a crash celpy would report; its value or error is of no interest.
    with contextlib.suppress(_CelError):
        fn(env)


def _strict(codes: Sequence[_Code]) -> list[_Fn]:
    """The children's closures, each made to run the later crash-prone ones before passing an error on."""
    fns = [code.fn for code in codes]
    for i in range(len(codes) - 1):
        later = [code.fn for code in codes[i + 1:] if code.crash]
        if later:
            fns[i] = _draining(fns[i], later)
    return fns


def _draining(fn: _Fn, later: list[_Fn]) -> _Fn:
    def strict(env: _Env) -> Any:
        try:
            return fn(env)
        except _CelError:
            for other in later:
                _drain(other, env)
            raise

    return strict


def _binary(op: _Binary, left: _Code, right: _Code) -> _Code:
    crash = left.crash or right.crash
    f, g = _strict((left, right))
    if right.const:
        b = right.value

        def with_constant(env: _Env) -> Any:
            return op(f(env), b)

        return _Code(with_constant, crash)
    if left.const:
        a = left.value

        def constant_with(env: _Env) -> Any:
            return op(a, g(env))

        return _Code(constant_with, crash)

    def binary(env: _Env) -> Any:
        return op(f(env), g(env))

    return _Code(binary, crash)


def _compare(op: _Binary, compare: Callable[[Any, Any], bool], left: _Code, right: _Code) -> _Code:
    """A comparison, with the common `x > 0` and `x < 0.5` on JSON numbers made cheap."""
    if right.const and type(right.value) in _NUMBER_TYPES:
        f, b = left.fn, right.value
        limit = _plain(b)

        def against_number(env: _Env) -> Any:
            a = f(env)
            return compare(a, limit) if type(a) is float else op(a, b)

        return _Code(against_number, left.crash)
    return _binary(op, left, right)


def _equals_null(left: _Code, negate: bool) -> _Code:
    f = left.fn

    def is_null(env: _Env) -> bool:
        return f(env) is None

    def is_not_null(env: _Env) -> bool:
        return f(env) is not None

    return _Code(is_not_null if negate else is_null, left.crash)


def _in_strings(left: _Code, strings: frozenset[str]) -> _Code:
    f = left.fn

    def in_strings(env: _Env) -> bool:
        item = f(env)
        # Anything but a string is unequal to every element, in celpy's heterogeneous equality.
        return _kind(item) == _STRING and item in strings

    return _Code(in_strings, left.crash)


def _is_bool(value: Any) -> bool:
    kind = type(value)
    return kind is bool or kind is _BoolType


def _logic(is_and: bool, left: _Code, right: _Code) -> _Code:
    """`&&` or `||` as celpy's logical_and/logical_or: commutative over errors and non-bools."""
    f, g, drain_right = left.fn, right.fn, right.crash
    decisive = not is_and  # the left value that settles the result: false for &&, true for ||

    def logic(env: _Env) -> Any:
        error: _CelError | None = None
        try:
            a = f(env)
        except _CelError as exc:
            error, a = exc, None
        else:
            kind = type(a)
            if kind is bool or kind is _BoolType:
                if bool(a) is decisive:
                    if drain_right:
                        _drain(g, env)
                    return decisive
                return g(env)  # `true && x` is x, whatever x is
        b = g(env)  # celpy: `error && error` and `1 && 'a'` are both no-overload errors
        if not _is_bool(b):
            raise _CelError(f"no matching overload for {'&&' if is_and else '||'}"
                            f" on {'an error' if error else _kind_name(a)} and {_kind_name(b)}")
        if bool(b) is decisive:
            return decisive
        if error is not None:
            raise error
        return a  # `1 && true` is 1 in celpy

    return _Code(logic, left.crash or right.crash)


def _ternary(cond: _Code, left: _Code, right: _Code) -> _Code:
    c, f, g = cond.fn, left.fn, right.fn

    def ternary(env: _Env) -> Any:
        try:
            value = c(env)
        except _CelError:
            if left.crash:
                _drain(f, env)  # celpy goes on into the first branch: an error value is truthy
            raise
        kind = type(value)
        if kind is bool or kind is _BoolType:
            return f(env) if value else g(env)
        branch = left if value else right
        if branch.crash:
            _drain(branch.fn, env)
        raise _CelError(f"no matching overload for {_kind_name(value)} ? _ : _")

    return _Code(ternary, cond.crash or left.crash or right.crash)


def _unary(op: Callable[[Any], Any], operand: _Code) -> _Code:
    f = operand.fn

    def unary(env: _Env) -> Any:
        return op(f(env))

    return _Code(unary, operand.crash)


def _call_code(op: Callable[..., Any], args: Sequence[_Code], crash: bool = False) -> _Code:
    fns = _strict(args)
    crash = crash or any(arg.crash for arg in args)
    if len(fns) == 1:
        (f,) = fns

        def call1(env: _Env) -> Any:
            return op(f(env))

        return _Code(call1, crash)
    if len(fns) == 2:
        f, g = fns

        def call2(env: _Env) -> Any:
            return op(f(env), g(env))

        return _Code(call2, crash)
    raise _Unsupported("arity")


def _variable(name: str) -> _Code:
    slot = _SLOTS[name]

    def variable(env: _Env) -> Any:
        value = env[slot]
        if type(value) is CELEvalError:
            raise _variable_error(value)
        return value

    return _Code(variable)


def _field(member: _Code, name: str, root: str | None, where: str | None = None) -> _Code:
    if root is not None:
        # `data.price`: the variable read inline, the commonest node of all.
        slot = _SLOTS[root]

        def root_field(env: _Env) -> Any:
            value = env[slot]
            if type(value) is dict:
                try:
                    return _lazy(value[name])
                except KeyError:
                    raise _missing_field(name, where) from None
            return _select(value, name, where)

        return _Code(root_field)
    f = member.fn

    def field(env: _Env) -> Any:
        return _select(f(env), name, where)

    return _Code(field, member.crash)


def _has_field(member: _Code, name: str) -> _Code:
    f = member.fn

    def has_field(env: _Env) -> bool:
        try:
            value = f(env)
        except _CelError:
            return False
        return (type(value) is dict or isinstance(value, _MapType)) and name in value

    return _Code(has_field, member.crash)


def _has(inner: _Code) -> _Code:
    f = inner.fn

    def has(env: _Env) -> bool:
        try:
            f(env)
        except _CelError:
            return False
        return True

    return _Code(has, inner.crash)


def _list_of(items: Sequence[_Code]) -> _Code:
    fns = _strict(items)

    def list_literal(env: _Env) -> Any:
        return _ListType([_deep(f(env)) for f in fns])

    return _Code(list_literal, any(item.crash for item in items))


def _matches_code(text: _Code, pattern: _Code) -> _Code:
    if not (pattern.const and _kind(pattern.value) == _STRING):
        return _call_code(_matches, (text, pattern))
    literal = pattern.value
    f = text.fn
    try:
        search = _searcher(re2.compile(literal))
    except Exception as exc:
        message = f"invalid regular expression {literal!r}: {_describe_error(exc)}"

        def invalid(env: _Env) -> Any:
            f(env)
            raise _CelError(message)

        return _Code(invalid, text.crash)

    def matches(env: _Env) -> Any:
        value = f(env)
        if _kind(value) == _STRING:
            try:
                return search(value)
            except ValueError as exc:  # a lone surrogate has no UTF-8
                raise _CelError(f"matches(): {_describe_error(exc)}") from None
        return _matches(value, literal)

    return _Code(matches, text.crash)


_RELATIONS: Final[dict[str, tuple[_Binary, Callable[[Any, Any], bool]]]] = {
    "relation_lt": (_ordering_op(operator.lt, "<"), operator.lt),
    "relation_le": (_ordering_op(operator.le, "<="), operator.le),
    "relation_gt": (_ordering_op(operator.gt, ">"), operator.gt),
    "relation_ge": (_ordering_op(operator.ge, ">="), operator.ge),
}
_ARITHMETIC: Final[dict[str, _Binary]] = {
    "addition_add": _add, "addition_sub": _sub, "multiplication_mul": _mul, "multiplication_div": _div,
    "multiplication_mod": _mod,
}
_FUNCTIONS_1: Final[dict[str, Callable[[Any], Any]]] = {
    "size": _size, "abs": _abs, "timestamp": _timestamp_of, "string": _string_of,
    "double": lambda value: _call(celtypes.DoubleType, value),
    "duration": lambda value: _call(_DurationType, value),
    "int": lambda value: _call(_IntType, value),
}
_FUNCTIONS_2: Final[dict[str, _Binary]] = {
    "startsWith": _starts_with, "endsWith": _ends_with, "contains": _contains, "matches": _matches,
}


def _tree(node: Any) -> lark.Tree[Any]:
    if not isinstance(node, lark.Tree):
        raise _Unsupported(repr(node))
    return node


def _mentions_variables(ast: lark.Tree[Any]) -> set[int]:
    """The ids of the nodes whose subtree reads a variable: every other node is a constant."""
    found: set[int] = set()

    def visit(node: lark.Tree[Any]) -> bool:
        mentions = node.data in {"ident", "dot_ident"} and _first_token(node) in VARIABLES
        for child in node.children:
            if isinstance(child, lark.Tree) and visit(child):
                mentions = True
        if mentions:
            found.add(id(node))
        return mentions

    visit(ast)
    return found


def _canonical(value: Any) -> bool:
    """Whether a constant is made only of values the fast path holds as celpy does."""
    kind = type(value)
    if kind is _ListType:
        return all(_canonical(item) for item in value)
    if kind is _MapType:
        return all(_canonical(key) and _canonical(item) for key, item in value.items())
    if kind is _TimestampType:
        return _sound(value)
    return value is None or kind in {_BoolType, _IntType, _UintType, celtypes.DoubleType, celtypes.StringType,
                                     celtypes.BytesType, _DurationType}


class _FastCompiler:
    """Compiles one rule's lark tree into closures; raises _Unsupported for anything outside the subset."""

    def __init__(self, ast: lark.Tree[Any]) -> None:
        self._variable_nodes = _mentions_variables(ast)
        self._handlers: dict[str, Callable[[lark.Tree[Any]], _Code]] = {
            "expr": self._expr, "conditionalor": self._or, "conditionaland": self._and,
            "relation": self._relation, "addition": self._arithmetic, "multiplication": self._arithmetic,
            "unary": self._unary, "member": self._single, "primary": self._single, "paren_expr": self._single,
            "member_dot": self._member_dot, "member_dot_arg": self._member_dot_arg,
            "member_index": self._member_index, "ident": self._ident, "dot_ident": self._ident,
            "ident_arg": self._ident_arg, "list_lit": self._list_lit,
        }

    def compile(self, node: lark.Tree[Any]) -> _Code:
        """The node's code: a constant, folded by celpy itself, or closures over the variables."""
        if id(node) not in self._variable_nodes:
            return self._fold(node)
        handler = self._handlers.get(str(node.data))
        if handler is None:
            raise _Unsupported(str(node.data))
        return handler(node)

    def _fold(self, node: lark.Tree[Any]) -> _Code:
        # Literals (escapes, int ranges, bytes...) and constant subexpressions such as duration("24h")
        # mean exactly what celpy says they mean, since celpy computes them, once.
        activation = Activation(vars={"math": _MATH}, functions=_FUNCTIONS)
        try:
            value = Evaluator(node, activation).evaluate()
        except CELEvalError as exc:
            message = _describe_error(exc)

            def error(env: _Env) -> Any:
                raise _CelError(message)

            return _Code(error)
        except Exception as exc:
            raise _Unsupported("constant that crashes celpy") from exc
        if not _canonical(value):
            raise _Unsupported(f"constant {value!r}")
        return _const(value)

    def _children(self, node: lark.Tree[Any]) -> list[_Code]:
        return [self.compile(_tree(child)) for child in node.children]

    def _single(self, node: lark.Tree[Any]) -> _Code:
        if len(node.children) != 1:
            raise _Unsupported(str(node.data))
        return self.compile(_tree(node.children[0]))

    def _expr(self, node: lark.Tree[Any]) -> _Code:
        if len(node.children) == 1:
            return self._single(node)
        cond, left, right = self._children(node)
        return _ternary(cond, left, right)

    def _or(self, node: lark.Tree[Any]) -> _Code:
        if len(node.children) == 1:
            return self._single(node)
        left, right = self._children(node)
        return _logic(False, left, right)

    def _and(self, node: lark.Tree[Any]) -> _Code:
        if len(node.children) == 1:
            return self._single(node)
        left, right = self._children(node)
        return _logic(True, left, right)

    def _operands(self, node: lark.Tree[Any]) -> tuple[str, _Code, _Code]:
        op_node, right_node = (_tree(child) for child in node.children)
        if len(op_node.children) != 1:
            raise _Unsupported(str(op_node.data))
        return str(op_node.data), self.compile(_tree(op_node.children[0])), self.compile(right_node)

    def _relation(self, node: lark.Tree[Any]) -> _Code:
        if len(node.children) == 1:
            return self._single(node)
        op, left, right = self._operands(node)
        if op in {"relation_eq", "relation_ne"}:
            negate = op == "relation_ne"
            if right.const and right.value is None:
                return _equals_null(left, negate)
            if left.const and left.value is None:
                return _equals_null(right, negate)
            return _binary(_ne if negate else _eq, left, right)
        if op == "relation_in":
            if right.const and type(right.value) is _ListType and all(
                    type(item) is celtypes.StringType for item in right.value):
                return _in_strings(left, frozenset(str(item) for item in right.value))
            return _binary(_in, left, right)
        ordered, compare = _RELATIONS[op]
        return _compare(ordered, compare, left, right)

    def _arithmetic(self, node: lark.Tree[Any]) -> _Code:
        if len(node.children) == 1:
            return self._single(node)
        op, left, right = self._operands(node)
        return _binary(_ARITHMETIC[op], left, right)

    def _unary(self, node: lark.Tree[Any]) -> _Code:
        if len(node.children) == 1:
            return self._single(node)
        op_node, operand = (_tree(child) for child in node.children)
        return _unary(_not if op_node.data == "unary_not" else _neg, self.compile(operand))

    def _ident(self, node: lark.Tree[Any]) -> _Code:
        name = _first_token(node)
        if name not in VARIABLES:
            raise _Unsupported(name)  # a macro's variable
        return _variable(name)

    def _member_dot(self, node: lark.Tree[Any]) -> _Code:
        member_node, name = node.children
        member = self.compile(_tree(member_node))
        root = _path(_tree(member_node))
        where = ".".join((*root, str(name))) if root is not None else None
        return _field(member, str(name), root[0] if root is not None and len(root) == 1 else None, where)

    def _args(self, node: lark.Tree[Any] | None) -> list[_Code]:
        return [] if node is None else self._children(node)

    def _member_dot_arg(self, node: lark.Tree[Any]) -> _Code:
        member_node, name_token, *rest = node.children
        name = str(name_token)
        args = self._args(_tree(rest[0]) if rest else None)
        member_tree = _tree(member_node)
        if name == "abs" and len(args) == 1 and _is_math(member_tree):
            return _call_code(_abs, args)
        receiver = self.compile(member_tree)
        if name == "size" and not args:
            return _call_code(_size, [receiver])
        if name == "matches" and len(args) == 1:
            return _matches_code(receiver, args[0])
        if name in _FUNCTIONS_2 and len(args) == 1:
            return _call_code(_FUNCTIONS_2[name], [receiver, args[0]])
        raise _Unsupported(f"method {name}")  # macros among them

    def _member_index(self, node: lark.Tree[Any]) -> _Code:
        container, key = self._children(node)
        return _binary(_index, container, key)

    def _ident_arg(self, node: lark.Tree[Any]) -> _Code:
        name = _first_token(node)
        arg_nodes = [_tree(child) for child in _tree(node.children[1]).children] if len(node.children) > 1 else []
        if name == "has" and len(arg_nodes) == 1:
            inner = arg_nodes[0]
            target = _unwrap(inner)
            if target.data == "member_dot" and id(target) in self._variable_nodes:
                member_node, field_name = target.children
                return _has_field(self.compile(_tree(member_node)), str(field_name))
            return _has(self.compile(inner))
        args = [self.compile(arg) for arg in arg_nodes]
        if name == "dyn" and len(args) == 1:
            return args[0]
        if name == "matches" and len(args) == 2:
            return _matches_code(args[0], args[1])
        if name in _FUNCTIONS_1 and len(args) == 1:
            # int() of an infinite double raises OverflowError out of celpy, and a timestamp with an
            # impossible offset makes comparisons raise: crashes, not error values.
            return _call_code(_FUNCTIONS_1[name], args, crash=name in {"int", "timestamp"})
        if name in _FUNCTIONS_2 and len(args) == 2:
            return _call_code(_FUNCTIONS_2[name], args)
        raise _Unsupported(f"function {name}")

    def _list_lit(self, node: lark.Tree[Any]) -> _Code:
        return _list_of(self._children(_tree(node.children[0])))


def _unwrap(node: lark.Tree[Any]) -> lark.Tree[Any]:
    """The node under a chain of single-child wrappers (expr, conditionalor, ..., member)."""
    while len(node.children) == 1 and isinstance(node.children[0], lark.Tree) and node.data in {
            "expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication", "unary",
            "member", "primary", "paren_expr"}:
        node = node.children[0]
    return node


def _is_math(node: lark.Tree[Any]) -> bool:
    node = _unwrap(node)
    return node.data == "ident" and _first_token(node) == "math"


def _compile_fast(ast: lark.Tree[Any]) -> _Fn | None:
    """The rule as closures, or None when it uses anything outside the fast subset."""
    try:
        return _FastCompiler(ast).compile(ast).fn
    except Exception:  # _Unsupported, or a tree too deep to walk: celpy evaluates the rule
        return None


# --- the generated path: one Python function per rule set, translated from the config ---------------------
#
# At compile time, every rule on the fast path is also translated into Python source for its *expected*
# case: plain JSON values of the kinds the rule works on (a JSON number where it compares or computes,
# a string where it matches...). The rules of one event type become one function, compiled once with
# compile(). Each value read is type-guarded; where a guard fails (a missing field, a string where a
# number was expected, a crash-prone branch that celpy would evaluate), or the rule is not true, the
# rule is handed to the closures (and, where they bail, to celpy), which decide it and word its reason.
# So the generated code only ever says "this rule holds", on values whose semantics it shares with the
# closures, and the differential tests hold all three paths to the same outcomes.
#
# The source is made of fixed templates, temporaries and namespace names only: every constant of the
# rule (numbers, strings, field names, compiled patterns) is bound in the function's namespace, never
# spelled into the source, and no value of an event ever becomes source text.

_GenCode = tuple[list[str], str, str]  # (statements, expression, kind of its value)
_CRASHING_CALLS: Final = frozenset({"int", "timestamp"})
_MISSING: Final = object()
_FLOAT_KINDS: Final = frozenset({"f", "i"})


class _SourceCompiler:
    """Translates one rule's lark tree into statements and an expression for its expected case.

    Kinds of generated values: f (a Python float), i (an int constant), s (str), b (bool), ts (timestamp),
    dur (duration), null, json (a value read out of data/last as parsed: any JSON value, ints not yet
    floats). Raises _Unsupported for anything outside the subset: the rule then goes to its closures.
    """

    def __init__(self, ast: lark.Tree[Any], namespace: dict[str, Any], counter: list[int]) -> None:
        self._variable_nodes = _mentions_variables(ast)
        self._folder = _FastCompiler(ast)
        self._ns = namespace
        self._counter = counter
        self._memo: list[dict[tuple[Any, ...], str]] = [{}]
        self.roots: set[str] = set()

    # -- names --

    def _tmp(self) -> str:
        self._counter[0] += 1
        return f"v{self._counter[0]}"

    def _bind(self, value: Any) -> str:
        self._counter[0] += 1
        name = f"k{self._counter[0]}"
        self._ns[name] = value
        return name

    def _remember(self, key: tuple[Any, ...]) -> str | None:
        for memo in reversed(self._memo):
            known: str | None = memo.get(key)
            if known is not None:
                return known
        return None

    def _block(self, node: lark.Tree[Any], coerce: str | None = None) -> _GenCode:
        """A node generated in a conditional block: what it reads is not remembered outside."""
        self._memo.append({})
        try:
            code = self.gen(node)
            return self._as(code, coerce) if coerce is not None else code
        finally:
            self._memo.pop()

    # -- kinds --

    def _as(self, code: _GenCode, kind: str) -> _GenCode:
        """`code` as a value of `kind` (f, s or b), with a guard where it may be something else."""
        stmts, expr, have = code
        if have == kind or (kind == "f" and have == "i"):
            return code
        if have != "json":
            raise _Unsupported(f"{have} as {kind}")
        key = ("as", kind, expr)
        known = self._remember(key)
        if known is not None:
            return stmts, known, kind
        t = self._tmp()
        if kind == "f":
            stmts = [*stmts, f"{t} = {expr}", f"if type({t}) is not float:",
                     f"    if type({t}) is not int: raise _Fallback", f"    {t} = float({t})"]
        elif kind == "s":
            stmts = [*stmts, f"{t} = {expr}", f"if type({t}) is not str: raise _Fallback"]
        elif kind == "b":
            stmts = [*stmts, f"{t} = {expr}", f"if type({t}) is not bool: raise _Fallback"]
        else:
            raise _Unsupported(kind)
        self._memo[-1][key] = t
        return stmts, t, kind

    def _constant(self, value: Any) -> _GenCode:
        kind = type(value)
        if value is None:
            return [], "None", "null"
        if kind is _BoolType:
            return [], "True" if value else "False", "b"
        if kind is celtypes.DoubleType:
            return [], self._bind(float(value)), "f"
        if kind is _IntType or kind is _UintType:
            return [], self._bind(int(value)), "i"
        if kind is celtypes.StringType:
            return [], self._bind(str(value)), "s"
        if kind is _DurationType:
            return [], self._bind(value), "dur"
        if kind is _TimestampType and _sound(value):
            return [], self._bind(value), "ts"
        raise _Unsupported(f"constant {value!r}")

    # -- nodes --

    def gen(self, node: lark.Tree[Any]) -> _GenCode:
        if id(node) not in self._variable_nodes:
            code = self._folder._fold(node)
            if not code.const:
                raise _Unsupported("constant error")
            return self._constant(code.value)
        data = str(node.data)
        if data in {"member", "primary", "paren_expr"} or (len(node.children) == 1 and data in {
                "expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication", "unary"}):
            if len(node.children) != 1:
                raise _Unsupported(data)
            return self.gen(_tree(node.children[0]))
        handler = getattr(self, f"_gen_{data}", None)
        if handler is None:
            raise _Unsupported(data)
        result: _GenCode = handler(node)
        return result

    def _gen_ident(self, node: lark.Tree[Any]) -> _GenCode:
        name = _first_token(node)
        if name in {"data", "last"}:
            self.roots.add(name)
            return [], name, "json"
        if name == "has_last":
            return [], "(last is not None)", "b"
        if name == "now":
            self.roots.add("now")
            return [], "now_ts", "ts"
        raise _Unsupported(name)  # event, a macro's variable

    _gen_dot_ident = _gen_ident

    def _gen_member_dot(self, node: lark.Tree[Any]) -> _GenCode:
        member_node, name = node.children
        stmts, expr, kind = self.gen(_tree(member_node))
        if kind != "json":
            raise _Unsupported(f"field of {kind}")
        key = ("field", expr, str(name))
        known = self._remember(key)
        if known is not None:
            return stmts, known, "json"
        t, k = self._tmp(), self._bind(str(name))
        stmts = [*stmts, f"{t} = {expr}.get({k}, _MISSING) if type({expr}) is dict else _MISSING",
                 f"if {t} is _MISSING: raise _Fallback"]
        self._memo[-1][key] = t
        return stmts, t, "json"

    def _gen_expr(self, node: lark.Tree[Any]) -> _GenCode:
        cond_node, left_node, right_node = (_tree(child) for child in node.children)
        stmts, cond, _ = self._as(self.gen(cond_node), "b")
        left, right = self._block(left_node), self._block(right_node)
        kind = left[2]
        # An int is only ever a constant here (CEL's int arithmetic is not a double's): a branch of one, or of
        # two kinds, is left to the closures.
        if right[2] != kind or kind in {"i", "null"}:
            raise _Unsupported(f"?: of {left[2]} and {right[2]}")
        t = self._tmp()
        return [*stmts, f"if {cond}:", *_indent(left[0]), f"    {t} = {left[1]}", "else:",
                *_indent(right[0]), f"    {t} = {right[1]}"], t, kind

    def _logic(self, node: lark.Tree[Any], is_and: bool) -> _GenCode:
        left_node, right_node = (_tree(child) for child in node.children)
        stmts, left, _ = self._as(self.gen(left_node), "b")
        r_stmts, right, _ = self._block(right_node, "b")
        t = self._tmp()
        decisive = "False" if is_and else "True"
        # celpy evaluates both sides: where the skipped side may crash it, the closures decide instead.
        skipped = ["raise _Fallback"] if _may_crash(right_node) else [f"{t} = {decisive}"]
        return [*stmts, f"if {left} is {decisive}:", *_indent(skipped), "else:", *_indent(r_stmts),
                f"    {t} = {right}"], t, "b"

    def _gen_conditionalor(self, node: lark.Tree[Any]) -> _GenCode:
        return self._logic(node, is_and=False)

    def _gen_conditionaland(self, node: lark.Tree[Any]) -> _GenCode:
        return self._logic(node, is_and=True)

    def _operands(self, node: lark.Tree[Any]) -> tuple[str, lark.Tree[Any], lark.Tree[Any]]:
        op_node, right_node = (_tree(child) for child in node.children)
        if len(op_node.children) != 1:
            raise _Unsupported(str(op_node.data))
        return str(op_node.data), _tree(op_node.children[0]), right_node

    def _pair(self, left: _GenCode, right: _GenCode, ordered: bool) -> tuple[list[str], str, str, str]:
        """Both operands as values of one kind (numbers as floats, or strings...), with guards."""
        kinds = {left[2], right[2]}
        if (kinds <= {"f", "i", "json"} and kinds != {"json"}) or (kinds == {"json"} and ordered):
            want = "f"
        elif kinds <= {"s", "json"}:
            want = "s"
        elif kinds <= {"b", "json"} and not ordered:
            want = "b"
        elif len(kinds) == 1 and next(iter(kinds)) in {"ts", "dur"}:
            want = left[2]
        else:
            raise _Unsupported(f"operands {kinds}")
        if want in {"f", "s", "b"}:
            left, right = self._as(left, want), self._as(right, want)
        return [*left[0], *right[0]], left[1], right[1], want

    def _gen_relation(self, node: lark.Tree[Any]) -> _GenCode:
        op, left_node, right_node = self._operands(node)
        left, right = self.gen(left_node), self.gen(right_node)
        if op in {"relation_eq", "relation_ne"}:
            test = "is not" if op == "relation_ne" else "is"
            if right[2] == "null" or left[2] == "null":
                value = left if right[2] == "null" else right
                other = right if right[2] == "null" else left
                return [*value[0], *other[0]], f"({value[1]} {test} None)", "b"
            stmts, a, b, _ = self._pair(left, right, ordered=False)
            return stmts, f"({a} {'!=' if op == 'relation_ne' else '=='} {b})", "b"
        symbol = _GEN_RELATIONS.get(op)
        if symbol is None:
            raise _Unsupported(op)  # in
        stmts, a, b, _ = self._pair(left, right, ordered=True)
        return stmts, f"({a} {symbol} {b})", "b"

    def _gen_addition(self, node: lark.Tree[Any]) -> _GenCode:
        op, left_node, right_node = self._operands(node)
        left, right = self.gen(left_node), self.gen(right_node)
        if op == "addition_sub" and left[2] == right[2] == "ts":
            # datetime's own subtraction, as _between's: a timedelta compares as the DurationType would.
            return [*left[0], *right[0]], f"_dt_sub({left[1]}, {right[1]})", "dur"
        return self._float_op(op, left, right)

    _gen_multiplication = _gen_addition

    def _float_op(self, op: str, left: _GenCode, right: _GenCode) -> _GenCode:
        if {left[2], right[2]} - {"f", "i", "json"}:
            raise _Unsupported(f"{op} of {left[2]} and {right[2]}")
        a, b = self._as_double(left), self._as_double(right)
        stmts = [*a[0], *b[0]]
        if op == "multiplication_div":
            t = self._tmp()
            return [*stmts, f"{t} = {a[1]} / {b[1]} if {b[1]} else _float_div({a[1]}, {b[1]})"], t, "f"
        symbol = _GEN_ARITHMETIC.get(op)
        if symbol is None:
            raise _Unsupported(op)  # %
        return stmts, f"({a[1]} {symbol} {b[1]})", "f"

    def _as_double(self, code: _GenCode) -> _GenCode:
        if code[2] == "i":  # lenient promotion: an int constant beside a double is a double
            return code[0], self._bind(float(self._ns[code[1]])), "f"
        return self._as(code, "f")

    def _gen_unary(self, node: lark.Tree[Any]) -> _GenCode:
        op_node, operand_node = (_tree(child) for child in node.children)
        if op_node.data == "unary_not":
            stmts, expr, _ = self._as(self.gen(operand_node), "b")
            return stmts, f"(not {expr})", "b"
        operand = self.gen(operand_node)
        if operand[2] not in {"f", "json"}:
            raise _Unsupported(f"-{operand[2]}")
        stmts, expr, _ = self._as(operand, "f")
        return stmts, f"(-{expr})", "f"

    def _call(self, name: str, receiver: lark.Tree[Any] | None, args: list[lark.Tree[Any]]) -> _GenCode:
        if receiver is not None:
            args = [receiver, *args]
        if name == "dyn" and len(args) == 1:
            return self.gen(args[0])
        if name == "abs" and len(args) == 1:
            operand = self.gen(args[0])
            if operand[2] not in {"f", "json"}:
                raise _Unsupported("abs")
            stmts, expr, _ = self._as(operand, "f")
            return stmts, f"abs({expr})", "f"
        if name == "timestamp" and len(args) == 1:
            stmts, expr, _ = self._as(self.gen(args[0]), "s")
            t = self._tmp()
            # RFC 3339 as producers write it: the datetime _timestamp_of reads, without the CEL wrapper
            # (timestamps here are only subtracted and compared, as datetimes).
            return [*stmts, f"if _rfc3339({expr}) is not None:", f"    {t} = _fromisoformat({expr})", "else:",
                    f"    {t} = _timestamp_of({expr})"], t, "ts"
        if name in {"matches", "startsWith", "endsWith", "contains"} and len(args) == 2:
            pattern = self.gen(args[1])
            if pattern[2] != "s" or pattern[1] not in self._ns:
                raise _Unsupported(f"{name} with a computed argument")
            stmts, text, _ = self._as(self.gen(args[0]), "s")
            literal = self._ns[pattern[1]]
            if name == "matches":
                try:
                    search = self._bind(_searcher(re2.compile(literal)))
                except Exception as exc:
                    raise _Unsupported("invalid pattern") from exc
                # Field values such as currencies repeat: short texts' results are remembered (bounded).
                cache, t = self._bind({}), self._tmp()
                return [*stmts, f"{t} = {cache}.get({text})", f"if {t} is None:", f"    {t} = {search}({text})",
                        f"    if len({text}) <= _CACHED_TEXT and len({cache}) < _CACHED_TEXTS: "
                        f"{cache}[{text}] = {t}"], t, "b"
            if name == "contains":
                return stmts, f"({pattern[1]} in {text})", "b"
            method = "startswith" if name == "startsWith" else "endswith"
            return stmts, f"{text}.{method}({pattern[1]})", "b"
        raise _Unsupported(f"function {name}")

    def _gen_ident_arg(self, node: lark.Tree[Any]) -> _GenCode:
        name = _first_token(node)
        args = [_tree(child) for child in _tree(node.children[1]).children] if len(node.children) > 1 else []
        if name == "has" and len(args) == 1:
            target = _unwrap(args[0])
            if target.data != "member_dot" or id(target) not in self._variable_nodes:
                raise _Unsupported("has()")
            member_node, field_name = target.children
            stmts, expr, _ = self.gen(_tree(member_node))
            k = self._bind(str(field_name))
            return stmts, f"(type({expr}) is dict and {k} in {expr})", "b"
        return self._call(name, None, args)

    def _gen_member_dot_arg(self, node: lark.Tree[Any]) -> _GenCode:
        member_node, name_token, *rest = node.children
        args = [_tree(child) for child in _tree(rest[0]).children] if rest else []
        member = _tree(member_node)
        if str(name_token) == "abs" and _is_math(member):
            return self._call("abs", None, args)
        return self._call(str(name_token), member, args)


_GEN_RELATIONS: Final = {"relation_lt": "<", "relation_le": "<=", "relation_gt": ">", "relation_ge": ">="}
_GEN_ARITHMETIC: Final = {"addition_add": "+", "addition_sub": "-", "multiplication_mul": "*"}


def _indent(lines: list[str]) -> list[str]:
    return [f"    {line}" for line in lines]


def _may_crash(node: lark.Tree[Any]) -> bool:
    """Whether a subtree calls a function that can crash celpy (whose crash a skipped branch still shows)."""
    return any(sub.data in {"ident_arg", "member_dot_arg"} and (
        _first_token(sub) in _CRASHING_CALLS or (
            len(sub.children) > 1 and str(sub.children[1]) in _CRASHING_CALLS)) for sub in node.iter_subtrees())


class _Fallback(Exception):
    """A guard of the generated code failed: the closures (and celpy) decide the rule."""


def _generate(rules: Sequence[_Rule]) -> tuple[Callable[[Any, Any, float], list[int]] | None, tuple[str, ...]]:
    """The rule set's generated function and the names of the rules it decides.

    The function takes (data, last, now) and returns the indices of the rules it did not find true: those
    are decided by the closures and celpy. None when no rule can be generated.
    """
    namespace: dict[str, Any] = {
        "_Fallback": _Fallback, "_MISSING": _MISSING, "_plain_json": _plain_json,
        "_dt_sub": _dt_sub, "_float_div": _float_div, "_timestamp_of": _timestamp_of,
        "_rfc3339": _RFC3339.fullmatch, "_fromisoformat": dt.datetime.fromisoformat, "_CACHED_TEXT": 64,
        "_CACHED_TEXTS": 4096, "_now": dt.datetime.fromtimestamp, "_UTC": _UTC,
    }
    counter = [0]
    roots: set[str] = set()
    body: list[str] = []
    generated: list[str] = []
    for index, rule in enumerate(rules):
        block: list[str] | None = None
        if rule.fast is not None and "event" not in rule.roots:
            compiler = _SourceCompiler(rule.ast, namespace, counter)
            try:
                stmts, expr, _ = compiler._as(compiler.gen(rule.ast), "b")
            except Exception:  # _Unsupported, a tree too deep to walk, or a construct it misjudged: closures
                pass
            else:
                roots |= compiler.roots
                block = ["try:", *_indent(stmts), f"    ok = {expr}", "except Exception:", "    ok = False",
                         "if ok is not True:", f"    slow.append({index})"]
                generated.append(rule.name)
        body.extend(block if block is not None else [f"slow.append({index})"])
    if not generated:
        return None, ()
    everything = list(range(len(rules)))
    namespace["_EVERY"] = everything
    prelude = ["slow = []"]
    if "data" in roots:
        prelude.append("if not _plain_json(data): return _EVERY[:]")
    if "last" in roots:
        prelude.append("if not _plain_json(last): return _EVERY[:]")
    if "now" in roots:
        prelude.append("now_ts = _now(now, _UTC)")  # the datetime of _fast_now's timestamp
    source = "\n".join(["def generated_rules(data, last, now):", *_indent(prelude), *_indent(body),
                        "    return slow", ""])
    try:
        exec(compile(source, "<byzguard rules>", "exec"), namespace)  # source from the config only
    except Exception:  # such as a rule set too large for the compiler: the closures serve it
        return None, ()
    function: Callable[[Any, Any, float], list[int]] = namespace["generated_rules"]
    function.__doc__ = source  # the generated source, for a reader in a debugger
    return function, tuple(generated)


# --- compilation --------------------------------------------------------------------------------------

_environment: celpy.Environment | None = None


def _env() -> celpy.Environment:
    # Built on first use: the CEL grammar is loaded once, and importing byzguard stays cheap.
    global _environment
    if _environment is None:
        _environment = celpy.Environment()
    return _environment


def _first_token(tree: lark.Tree[Any]) -> str:
    token = tree.children[0]
    return str(token.value) if isinstance(token, lark.Token) else ""


def _macro_variables(ast: lark.Tree[Any]) -> set[str]:
    """Names bound by macros such as `data.items.all(i, i.qty > 0)`, allowed anywhere in the rule."""
    bound: set[str] = set()
    for node in ast.iter_subtrees():
        if node.data != "member_dot_arg" or len(node.children) < 3:
            continue
        method, args = node.children[1], node.children[2]
        if isinstance(method, lark.Token) and method.value in _MACROS and isinstance(args, lark.Tree):
            first = args.children[0]
            if isinstance(first, lark.Tree):
                bound.update(_first_token(n) for n in first.iter_subtrees() if n.data == "ident")
    return bound


def _check_names(ast: lark.Tree[Any]) -> frozenset[str]:
    """The variables the rule uses; unknown variables and functions are refused now, not per event."""
    bound = _macro_variables(ast)
    allowed = VARIABLES | {"math"} | _TYPE_NAMES | bound
    used: set[str] = set()
    for node in ast.iter_subtrees():
        if node.data in {"ident", "dot_ident"}:
            name = _first_token(node)
            if name in VARIABLES and (name not in bound or node.data == "dot_ident"):
                used.add(name)
            elif name not in allowed:
                raise ValueError(f"unknown variable {name!r} (known: {', '.join(sorted(VARIABLES))})")
        elif node.data in {"ident_arg", "dot_ident_arg"}:
            name = _first_token(node)
            if name not in _KNOWN_FUNCTIONS and name not in _FUNCTION_MACROS:
                raise ValueError(f"unknown function {name!r}")
        elif node.data == "member_dot_arg":
            method = node.children[1]
            name = str(method.value) if isinstance(method, lark.Token) else ""
            if name not in _KNOWN_FUNCTIONS and name not in _MACROS:
                raise ValueError(f"unknown function or method {name!r}")
        elif node.data == "member_object":
            raise ValueError("message construction (Type{field: ...}) is not supported")
    return frozenset(used)


def _path(node: lark.Tree[Any]) -> tuple[str, ...] | None:
    """`data.a.b` as ("data", "a", "b") when the node is such a field chain, else None."""
    while node.data in {"member", "primary"} and len(node.children) == 1:
        child = node.children[0]
        if not isinstance(child, lark.Tree):
            return None
        node = child
    if node.data == "ident":
        name = _first_token(node)
        return (name,) if name in _QUOTED_ROOTS else None
    if node.data == "member_dot" and isinstance(node.children[0], lark.Tree):
        head = _path(node.children[0])
        field = node.children[1]
        if head is not None and isinstance(field, lark.Token):
            return (*head, str(field.value))
    return None


def _quoted_paths(ast: lark.Tree[Any]) -> tuple[tuple[str, ...], ...]:
    found: list[tuple[str, ...]] = []
    stack = [ast]
    while stack:  # pre-order, so paths come out in source order
        node = stack.pop()
        path = _path(node) if node.data == "member_dot" else None
        if path is not None:
            # Only the longest chain: `data.a.b` rather than also `data.a`, found inside it.
            if not any(seen[: len(path)] == path for seen in found):
                found.append(path)
            continue
        stack.extend(child for child in reversed(node.children) if isinstance(child, lark.Tree))
    return tuple(found[:_DETAIL_VALUES])


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    expr: str
    severity: Severity
    message: str
    ast: lark.Tree[Any]
    paths: tuple[tuple[str, ...], ...]
    roots: frozenset[str]
    fast: _Fn | None = None  # the rule compiled to closures, or None: celpy evaluates it every time

    def check(self, activation: Activation, inputs: Mapping[str, Any]) -> Reason | None:
        """None when the rule holds; a violation or an error reason otherwise. Never raises."""
        try:
            value = Evaluator(self.ast, activation).evaluate()
        except Exception as exc:
            # A bad event is a verdict, not a crash: celpy errors and celpy bugs alike.
            return self.error(_describe_error(exc))
        if isinstance(value, _BOOL_TYPES):
            return None if value else self.violation(inputs)
        return self.error(f"result is {_cel_type_name(value)}, not bool")

    def error(self, text: str) -> Reason:
        """The reason for a rule that could not be evaluated on this event."""
        detail = f"rule {self.name!r} could not be evaluated: {text}"
        return Reason(Code.INVARIANT_ERROR, detail, self.severity)

    def violation(self, inputs: Mapping[str, Any]) -> Reason:
        """The reason for a rule that evaluated to false, quoting the simple values it looked at."""
        quoted = []
        for path in self.paths:
            found, value = _lookup(inputs.get(path[0]), path[1:])
            text = _format_value(value) if found else None
            if text is not None:
                quoted.append(f"{'.'.join(path)}={text}")
        detail = f"rule {self.name!r} failed: {self.message or self.expr}"
        if quoted:
            detail += f" ({', '.join(quoted)})"
        return Reason(Code.INVARIANT_VIOLATED, detail, self.severity)


def _syntax_error(expr: str, exc: CELParseError) -> str:
    """One line saying where the expression stops parsing (celpy's own message is a multi-line caret)."""
    if exc.line is None or exc.column is None:
        return f"CEL syntax error in {expr!r}: {' '.join(str(exc.args[0]).split()) if exc.args else exc}"
    lines = expr.splitlines() or [""]
    rest = lines[exc.line - 1][exc.column - 1 :].strip() if exc.line <= len(lines) else ""
    near = f"near {rest[:20]!r}" if rest else "at the end"
    return f"CEL syntax error at line {exc.line}, column {exc.column} ({near}) in {expr!r}"


def _compile_one(spec: RuleSpec) -> _Rule:
    if not isinstance(spec.name, str) or not spec.name.strip():
        raise RuleCompileError(f"invariant rule with an empty name (expression {spec.expr!r})")
    try:
        severity = Severity(spec.severity)
    except ValueError:
        raise RuleCompileError(
            f"rule {spec.name!r}: unknown severity {spec.severity!r} (reject, warn or off)"
        ) from None
    if not isinstance(spec.expr, str) or not spec.expr.strip():
        raise RuleCompileError(f"rule {spec.name!r}: empty expression")
    try:
        ast = _env().compile(spec.expr)
    except CELParseError as exc:
        raise RuleCompileError(f"rule {spec.name!r}: {_syntax_error(spec.expr, exc)}") from exc
    except Exception as exc:
        raise RuleCompileError(f"rule {spec.name!r}: cannot compile {spec.expr!r}: {exc}") from exc
    try:
        roots = _check_names(ast)
    except ValueError as exc:
        raise RuleCompileError(f"rule {spec.name!r}: {exc} in {spec.expr!r}") from exc
    return _Rule(spec.name, spec.expr, severity, spec.message, ast, _quoted_paths(ast), roots, _compile_fast(ast))


def compile_rules(specs: Sequence[RuleSpec]) -> RuleSet:
    """Compile rule specs into a RuleSet; raise RuleCompileError naming the first rule that is refused.

    Rules with severity ``off`` are checked for errors but never evaluated.
    """
    rules: list[_Rule] = []
    names: set[str] = set()
    for spec in specs:
        rule = _compile_one(spec)
        if rule.name in names:
            raise RuleCompileError(f"rule {rule.name!r} is defined twice")
        names.add(rule.name)
        if rule.severity is not Severity.OFF:
            rules.append(rule)
    return RuleSet(tuple(rules))


class RuleSet:
    """The compiled invariant rules of one event type; evaluate() them against each event."""

    __slots__ = ("_fast_roots", "_generated", "_generated_names", "_roots", "_rules", "_uses_event", "_uses_last")

    def __init__(self, rules: tuple[_Rule, ...] = (), *, generate: bool = True) -> None:
        self._rules = rules
        self._generated, self._generated_names = _generate(rules) if generate else (None, ())
        self._roots = frozenset[str]().union(*(rule.roots for rule in rules))
        fast = [rule.roots for rule in rules if rule.fast is not None]
        self._fast_roots = frozenset[str]().union(*fast) if fast else None
        self._uses_last = "last" in self._roots or "has_last" in self._roots
        # A violation quotes `event.x` paths even where `event` is a macro's own variable: those read the
        # attributes too.
        self._uses_event = "event" in self._roots or any(
            path[0] == "event" for rule in rules for path in rule.paths)

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"RuleSet({list(self.names)!r})"

    @property
    def uses_last(self) -> bool:
        """Whether any rule reads `last` or `has_last`: if not, callers need not load last-known-good."""
        return self._uses_last

    @property
    def uses_event(self) -> bool:
        """Whether any rule reads (or quotes) `event`: if not, callers need not build the attributes."""
        return self._uses_event

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the rules that are evaluated, in order."""
        return tuple(rule.name for rule in self._rules)

    @property
    def compiled_fast(self) -> tuple[str, ...]:
        """The names of the rules compiled to closures; the others are evaluated by celpy."""
        return tuple(rule.name for rule in self._rules if rule.fast is not None)

    @property
    def generated(self) -> tuple[str, ...]:
        """The names of the rules also translated into the rule set's generated Python function."""
        return self._generated_names

    def evaluate(self, data: Any, last: Any, *, now: float, event: Mapping[str, Any]) -> list[Reason]:
        """One Reason per rule that fails (invariant.violated) or cannot be evaluated (invariant.error).

        `data` and `last` are parsed JSON (`last` None when unknown), `now` is epoch seconds and `event`
        holds the envelope attributes. Never raises.
        """
        rules = self._rules
        if not rules:
            return []
        generated = self._generated
        if generated is not None:
            try:
                slow = generated(data, last, now)
            except Exception:  # such as a `now` the rules can't hold: the closures and celpy say what it is
                slow = None
            if slow is not None:
                if not slow:
                    return []  # every rule holds
                rules = tuple([rules[index] for index in slow])
        return self._decide(rules, data, last, now, event)

    def _decide(self, rules: tuple[_Rule, ...], data: Any, last: Any, now: float,
                event: Mapping[str, Any]) -> list[Reason]:
        """The reasons of `rules` (some of this set's), decided by their closures or by celpy."""
        converted: dict[str, Any] = {}
        env = _NO_ENV
        if self._fast_roots is not None:
            try:
                env = _fast_env(self._fast_roots, data, last, now, event, converted)
            except Exception:  # _Bail, or a failure in spite of the guarded conversions: celpy copes
                converted.clear()
        inputs = {"data": data, "last": last, "event": event}
        activation: Activation | None = None
        reasons = []
        for rule in rules:
            if rule.fast is not None and env is not _NO_ENV:
                try:
                    value = rule.fast(env)
                except _CelError as exc:
                    reasons.append(rule.error(str(exc)))
                    continue
                except Exception:
                    pass  # _Bail, or a failure the fast path did not foresee: celpy's answer is the reference
                else:
                    if type(value) is bool or type(value) is celtypes.BoolType:
                        if not value:
                            reasons.append(rule.violation(inputs))
                    else:
                        reasons.append(rule.error(f"result is {_kind_name(value)}, not bool"))
                    continue
            if activation is None:
                try:
                    activation = _activation(self._roots, data, last, now, event, converted)
                except Exception as exc:  # conversions are guarded one by one; this is only a last resort
                    reasons.append(rule.error(f"cannot prepare the event for rules: {_describe_error(exc)}"))
                    continue
            reason = rule.check(activation, inputs)
            if reason is not None:
                reasons.append(reason)
        return reasons


def _celpy_only(rules: RuleSet) -> RuleSet:
    """The same rules with the fast path off: the reference the differential tests and the benchmark use."""
    return RuleSet(tuple(replace(rule, fast=None) for rule in rules._rules))


def _closures_only(rules: RuleSet) -> RuleSet:
    """The same rules without the generated function: closures, and celpy where they bail."""
    return RuleSet(rules._rules, generate=False)
