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

Cost: the event's values are converted to CEL once per event, and only the variables some rule uses;
an empty RuleSet returns at once. celpy then walks each rule's parse tree on every evaluation, which
costs roughly 0.1-0.6 ms per rule for the seed's rules: rule sets belong on the event types that need them.
"""

from __future__ import annotations

import datetime as dt
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import celpy
import lark
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
    roots: frozenset[str], data: Any, last: Any, now: float, event: Mapping[str, Any]
) -> Activation:
    """One activation per event, shared by every rule, binding only the variables the rules use."""
    bound: dict[str, Any] = {"math": _MATH}
    if "data" in roots:
        bound["data"] = _convert("data", _to_cel, data)
    if "last" in roots:
        bound["last"] = _convert("last", _to_cel, last)
    if "has_last" in roots:
        bound["has_last"] = _int_new(celtypes.BoolType, last is not None)
    if "now" in roots:
        bound["now"] = _convert("now", _now, now)
    if "event" in roots:
        bound["event"] = _convert("event", _event_to_cel, event)
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
    return _Rule(spec.name, spec.expr, severity, spec.message, ast, _quoted_paths(ast), roots)


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

    __slots__ = ("_roots", "_rules")

    def __init__(self, rules: tuple[_Rule, ...] = ()) -> None:
        self._rules = rules
        self._roots = frozenset[str]().union(*(rule.roots for rule in rules))

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"RuleSet({list(self.names)!r})"

    @property
    def uses_last(self) -> bool:
        """Whether any rule reads `last` or `has_last`: if not, callers need not load last-known-good."""
        return "last" in self._roots or "has_last" in self._roots

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the rules that are evaluated, in order."""
        return tuple(rule.name for rule in self._rules)

    def evaluate(self, data: Any, last: Any, *, now: float, event: Mapping[str, Any]) -> list[Reason]:
        """One Reason per rule that fails (invariant.violated) or cannot be evaluated (invariant.error).

        `data` and `last` are parsed JSON (`last` None when unknown), `now` is epoch seconds and `event`
        holds the envelope attributes. Never raises.
        """
        if not self._rules:
            return []
        try:
            activation = _activation(self._roots, data, last, now, event)
        except Exception as exc:  # conversions are guarded one by one; this is only a last resort
            text = f"cannot prepare the event for rules: {_describe_error(exc)}"
            return [rule.error(text) for rule in self._rules]
        inputs = {"data": data, "last": last, "event": event}
        reasons = []
        for rule in self._rules:
            reason = rule.check(activation, inputs)
            if reason is not None:
                reasons.append(reason)
        return reasons
