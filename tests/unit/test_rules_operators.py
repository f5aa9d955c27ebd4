"""The fast path's operators (byzguard.rules.operators): every operator over every kind agrees with celpy."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest
from celpy.celtypes import BoolType, DoubleType, ListType, MapType, StringType, TimestampType
from celpy.evaluation import CELEvalError, Evaluator
from hypothesis import given, settings
from hypothesis import strategies as st
from lark import Tree

from byzguard.rules import VARIABLES, closures, conversion, environment, operators
from byzguard.rules.closures import _fast_env
from byzguard.rules.operators import _Bail, _CelError, _PlainStr
from tests.unit.rules_cases import EVENT, NOW

# Values of every kind the fast path handles, as expressions reading `data` (so the operators run per
# evaluation rather than being folded by celpy at compile time), plus a few constants.
KIND_DATA: dict[str, Any] = {"n": None, "t": True, "f": False, "d": 2.5, "z": 0.0, "inf": math.inf,
                             "l": [1, 2], "e": [], "s": "ab", "es": "", "m": {"a": 1},
                             "ts": "2025-06-15T14:13:20+05:30"}
KIND_EXPRS = {
    "null": "data.n", "true": "data.t", "false": "data.f", "double": "data.d", "zero": "data.z",
    "infinity": "data.inf", "int": "size(data.l)", "int zero": "size(data.e)", "negative int": "-size(data.l)",
    "int literal": "2", "uint": "2u", "uint zero": "0u", "double zero literal": "0.0", "string": "data.s",
    "empty string": "data.es", "computed string": "data.s + 'x'", "bytes": "b'ab'", "list": "data.l",
    "list literal": "[data.d]", "map": "data.m", "map literal": "{'a': 1, 2: 'b'}", "timestamp": "now",
    "parsed timestamp": "timestamp(data.ts)", "duration": "duration('1h')", "zero duration": "now - now",
    "error": "data.missing", "crash": "int(data.inf)",
}
BINARY_OPERATORS = ["+", "-", "*", "/", "%", "<", "<=", ">", ">=", "==", "!=", "in", "&&", "||"]
# Templates over placeholders A and B, into which each kind's parsed expression is grafted.
TEMPLATES = (
    ["-A", "!A", "size(A)", "A.size()", "abs(A)", "int(A)", "double(A)", "string(A)", "timestamp(A)",
     "duration(A)", "A.a", "has(A.a)", "A ? 1 : 2", "dyn(A)", "[A]"],
    [*(f"A {op} B" for op in BINARY_OPERATORS),
     "A[B]", "A.startsWith(B)", "endsWith(A, B)", "A.contains(B)", "A.matches(B)", "true ? A : B"],
)
# The celpy type each of the fast path's own representations stands for.
CELPY_TYPES = {float: DoubleType, str: StringType, bool: BoolType, dict: MapType, list: ListType, _PlainStr: str}


def primary(expr: str) -> Tree[Any]:
    """The `primary` node of `(expr)`: a parenthesised operand, ready to graft into a template."""
    node = environment._env().compile(f"({expr})")
    while node.data != "primary":
        node = node.children[0]
    return node


def graft(node: Tree[Any], operands: dict[str, Tree[Any]]) -> Tree[Any]:
    """A copy of a template's tree with each placeholder's primary node replaced by its operand's."""
    if node.data == "primary" and isinstance(node.children[0], Tree) and node.children[0].data == "ident":
        name = environment._first_token(node.children[0])
        if name in operands:
            return operands[name]
    return Tree(node.data, [graft(child, operands) if isinstance(child, Tree) else child
                            for child in node.children], node.meta)


# Variants that add nothing to a pair of kinds (a second double, a second string) are left out of pairs,
# to keep the matrix to a few thousand cases; errors and crashes pair with every kind in the logic.
PAIR_KINDS = ["null", "true", "double", "zero", "int", "int zero", "uint", "string", "computed string", "bytes",
              "list", "map literal", "timestamp", "duration", "error"]
LOGIC_TEMPLATES = ("A && B", "A || B", "true ? A : B", "A == B")


def kind_matrix() -> list[tuple[str, Tree[Any]]]:
    """Every operator and function of the subset over every kind (or pair of kinds), parsed."""
    operands = {name: primary(expr) for name, expr in KIND_EXPRS.items()}
    unary, binary = ([(t, environment._env().compile(t)) for t in group] for group in TEMPLATES)

    def case(text: str, tree: Tree[Any], a: str, b: str | None = None) -> tuple[str, Tree[Any]]:
        label = text.replace("A", f"<{a}>").replace("B", f"<{b}>")
        return label, graft(tree, {"A": operands[a]} if b is None else {"A": operands[a], "B": operands[b]})

    cases = [case(text, tree, a) for a in operands for text, tree in unary]
    cases += [case(text, tree, a, b) for a in PAIR_KINDS for b in PAIR_KINDS for text, tree in binary]
    cases += [case(text, tree, a, b) for a in operands for b in ("error", "crash") for text, tree in binary
              if text in LOGIC_TEMPLATES for a, b in ((a, b), (b, a))]
    return cases


def celpy_result(ast: Tree[Any]) -> tuple[str, Any]:
    """What celpy makes of an expression over KIND_DATA: ("value", v), ("error", None) or ("crash", None)."""
    activation = conversion._activation(frozenset(VARIABLES), KIND_DATA, None, NOW, EVENT)
    try:
        return "value", Evaluator(ast, activation).evaluate()
    except CELEvalError:
        return "error", None
    except Exception:
        return "crash", None


def fast_result(ast: Tree[Any]) -> tuple[str, Any]:
    """What the closures make of it: ("value", v), ("error", None) or ("bail", None)."""
    fast = closures._compile_fast(ast)
    if fast is None:
        # Only a constant celpy folds into something outside the fast path's values (`-duration('1h')`
        # is a bare timedelta in celpy) leaves a rule to celpy.
        assert id(ast) not in closures._mentions_variables(ast)
        return "bail", None
    env = _fast_env(frozenset(VARIABLES), KIND_DATA, None, NOW, EVENT, {})
    try:
        return "value", fast(env)
    except _CelError:
        return "error", None
    except (_Bail, OverflowError):
        return "bail", None


def same_value(fast: Any, reference: Any) -> bool:
    """The fast path's value stands for celpy's: the corresponding type and an equal value."""
    if type(reference) is not CELPY_TYPES.get(type(fast), type(fast)):
        return False
    if isinstance(reference, float) and math.isnan(reference):
        return math.isnan(fast)
    if isinstance(reference, dt.datetime) and reference.utcoffset() != fast.utcoffset():
        return False
    return environment._equal(operators._deep(fast), reference)


def test_kind_matrix_agrees_with_celpy() -> None:
    """Every operator and function over every pair of kinds: the closures' value, error or hand-over to
    celpy matches what celpy computes, type for type, including celpy's quirks and crashes."""
    decided = 0
    mismatches = []
    cases = kind_matrix()
    for text, ast in cases:
        reference, fast = celpy_result(ast), fast_result(ast)
        if fast[0] == "bail":
            continue
        decided += 1
        agree = fast[0] == reference[0] and (fast[0] != "value" or same_value(fast[1], reference[1]))
        if not agree:
            mismatches.append(f"{text}: fast {fast!r}, celpy {reference!r}")
    assert mismatches == []
    assert decided > 0.8 * len(cases)  # hand-overs to celpy are for celpy's quirks only


@settings(max_examples=300, deadline=None)
@given(moment=st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)),
       offset=st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1), digits=st.integers(0, 9),
       zulu=st.booleans())
def test_timestamp_parsing_matches_pendulum(moment: dt.datetime, offset: int, digits: int, zulu: bool) -> None:
    """RFC 3339 text the fast path parses itself gives the same instant, offset and text as celpy's."""
    fraction = f"{moment.microsecond:06d}{moment.microsecond % 1000:03d}"[:digits]
    zone = "Z" if zulu else f"{'-' if offset < 0 else '+'}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    text = moment.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0") + (f".{fraction}" if fraction else "") + zone
    try:
        expected = TimestampType(text)
    except ValueError:
        with pytest.raises(_CelError):
            operators._timestamp_of(text)
        return
    parsed = operators._timestamp_of(text)
    assert type(parsed) is TimestampType
    assert parsed == expected and parsed.utcoffset() == expected.utcoffset()
    assert str(parsed) == str(expected)
