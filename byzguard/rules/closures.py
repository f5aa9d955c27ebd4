"""The fast path: each rule compiled once into nested Python closures that compute what celpy would."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import lark
import re2  # type: ignore[import-untyped]  # celpy's own regex engine: `matches` is RE2
from celpy import celtypes
from celpy.evaluation import Activation, CELEvalError, Evaluator

from byzguard.rules.conversion import (
    _TIME_KEY,
    _convert,
    _event_to_cel,
    _fast_now,
    _plain_json,
    _TimestampType,
    _to_cel,
)
from byzguard.rules.environment import _FUNCTIONS, _MATH, _NUMBER_TYPES, VARIABLES, _Binary, _first_token, _path, _plain
from byzguard.rules.operators import (
    _STRING,
    _abs,
    _add,
    _Bail,
    _BoolType,
    _call,
    _CelError,
    _contains,
    _deep,
    _div,
    _DurationType,
    _ends_with,
    _eq,
    _in,
    _index,
    _IntType,
    _kind,
    _kind_name,
    _lazy,
    _ListType,
    _MapType,
    _matches,
    _missing_field,
    _mod,
    _mul,
    _ne,
    _neg,
    _not,
    _ordering_op,
    _searcher,
    _select,
    _size,
    _sound,
    _starts_with,
    _string_of,
    _sub,
    _timestamp_of,
    _UintType,
    _variable_error,
)
from byzguard.rules.wording import _describe_error

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


class _Unsupported(Exception):
    """A construct outside the fast subset: the rule is always evaluated by celpy."""


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
