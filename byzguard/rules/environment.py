"""The CEL environment of the rules: the variables and functions a rule may name, and CEL's numbers.

What celpy evaluates with: heterogeneous comparison and equality of numbers, the lenient double arithmetic and
`abs`, bound as celpy functions; the parser (built once); and the compile-time check of a rule's names.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, Final

import celpy
import lark
from celpy import celtypes
from celpy.evaluation import CELEvalError, base_functions, operator_in

#: Top-level names a rule may refer to.
VARIABLES: Final = frozenset({"data", "last", "has_last", "now", "event"})

# Roots whose `a.b.c` paths are quoted back, with their values, in a violation's detail.
_QUOTED_ROOTS: Final = frozenset({"data", "last", "event"})

_MACROS: Final = frozenset({"map", "filter", "all", "exists", "exists_one", "reduce", "min"})
_FUNCTION_MACROS: Final = frozenset({"has", "dyn"})
# Type names are values in CEL (`type(x) == double`); celpy resolves them through its function table.
_TYPE_NAMES: Final = frozenset(
    {"bool", "bytes", "double", "duration", "int", "list", "map", "null_type", "string", "timestamp",
     "type", "uint"}
)


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


def _cel_type_name(value: Any) -> str:
    if value is None:
        return "null"
    name = type(value).__name__
    return {"float": "double", "str": "string"}.get(name, name.removesuffix("Type").lower())


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
