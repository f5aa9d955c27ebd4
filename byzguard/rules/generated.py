"""The generated path: the rules of one event type translated into one Python function, from the config only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import lark
import re2  # type: ignore[import-untyped]  # celpy's own regex engine: `matches` is RE2
from celpy import celtypes

from byzguard.isotime import LAST as _LAST_ISO
from byzguard.rules.closures import _FastCompiler, _is_math, _mentions_variables, _tree, _Unsupported, _unwrap
from byzguard.rules.conversion import _UTC, _dt_new, _plain_json, _TimestampType
from byzguard.rules.environment import _first_token, _float_div
from byzguard.rules.operators import (
    _RFC3339,
    _BoolType,
    _DurationType,
    _IntType,
    _searcher,
    _sound,
    _timestamp_of,
    _UintType,
)

if TYPE_CHECKING:
    from byzguard.rules.ruleset import _Rule


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
            return [], self._bind(_plain_timedelta(value)), "dur"
        if kind is _TimestampType and _sound(value):
            return [], self._bind(_plain_datetime(value)), "ts"
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
        # data_map and last_map are the variables when they are dicts, else empty (see _generate).
        read = f"{expr}_map.get({k}, _MISSING)" if expr in {"data", "last"} else \
            f"{expr}.get({k}, _MISSING) if type({expr}) is dict else _MISSING"
        stmts = [*stmts, f"{t} = {read}", f"if {t} is _MISSING: raise _Fallback"]
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
        symbol = _GEN_RELATIONS.get(op)
        if symbol is not None:
            since = self._since_now(left_node, right_node, symbol)
            if since is None:
                since = self._since_now(right_node, left_node, _MIRRORED[symbol])
            if since is not None:
                return since
        left, right = self.gen(left_node), self.gen(right_node)
        if op in {"relation_eq", "relation_ne"}:
            test = "is not" if op == "relation_ne" else "is"
            if right[2] == "null" or left[2] == "null":
                value = left if right[2] == "null" else right
                other = right if right[2] == "null" else left
                return [*value[0], *other[0]], f"({value[1]} {test} None)", "b"
            stmts, a, b, _ = self._pair(left, right, ordered=False)
            return stmts, f"({a} {'!=' if op == 'relation_ne' else '=='} {b})", "b"
        if symbol is None:
            raise _Unsupported(op)  # in
        stmts, a, b, _ = self._pair(left, right, ordered=True)
        return stmts, f"({a} {symbol} {b})", "b"

    def _since_now(self, elapsed: lark.Tree[Any], limit: lark.Tree[Any], symbol: str) -> _GenCode | None:
        """`now - x < duration('24h')` (any ordering, a constant duration) without `now` as a datetime.

        Making a datetime of `now` costs more than the rest of such a rule: the seconds between the two,
        compared as floats, decide it wherever they are more than a millisecond from the limit (float error
        is below 0.1 ms anywhere in datetime's range); nearer, the datetimes decide, exactly. None when the
        relation is not of that form.
        """
        since = _unwrap(elapsed)
        if since.data != "addition" or len(since.children) != 2 or id(limit) in self._variable_nodes:
            return None
        op_node, moment_node = (_tree(child) for child in since.children)
        if op_node.data != "addition_sub" or len(op_node.children) != 1:
            return None
        now_node = _unwrap(_tree(op_node.children[0]))
        if now_node.data != "ident" or _first_token(now_node) != "now":
            return None
        bound = self.gen(limit)
        if bound[2] != "dur":
            return None
        stmts, moment, kind = self.gen(moment_node)
        if kind != "ts":
            raise _Unsupported(f"now - {kind}")
        self.roots.add("now")
        seconds, t, result = self._bind(self._ns[bound[1]].total_seconds()), self._tmp(), self._tmp()
        # The seconds of the time decode parsed (byzguard.isotime) when the moment is that very datetime.
        last = self._tmp()
        return [*stmts, f"{last} = _LAST_ISO[0]",
                f"{t} = now - ({last}[2] if {moment} is {last}[1] else {moment}.timestamp()) - {seconds}",
                f"if _NOW_MIN < now < _NOW_MAX and not -_NEAR < {t} < _NEAR:", f"    {result} = {t} {symbol} 0.0",
                "else:", f"    {result} = (_now(now, _UTC) - {moment}) {symbol} {bound[1]}"], result, "b"

    def _gen_addition(self, node: lark.Tree[Any]) -> _GenCode:
        op, left_node, right_node = self._operands(node)
        left, right = self.gen(left_node), self.gen(right_node)
        if op == "addition_sub" and left[2] == right[2] == "ts":
            # Timestamps here are plain datetimes (see _plain_datetime): datetime's own subtraction, as
            # _between's, whose timedelta compares as the DurationType would.
            return [*left[0], *right[0]], f"({left[1]} - {right[1]})", "dur"
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
            # (timestamps here are only subtracted and compared, as datetimes). JavaScript's toISOString()
            # form is told by its shape, cheaper than the pattern: fromisoformat then accepts it only
            # where every other character is a digit, as the pattern wants.
            return [*stmts, f"if ({expr}[23:] == _ZULU and {expr}[4:20:3] == _ISO_MARKS) "
                    f"or _rfc3339({expr}) is not None:", f"    {t} = _LAST_ISO[0]",
                    f"    {t} = {t}[1] if {expr} == {t}[0] else _fromisoformat({expr})", "else:",
                    f"    {t} = _plain_datetime(_timestamp_of({expr}))"], t, "ts"
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
_MIRRORED: Final = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}
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


def _plain_datetime(moment: dt.datetime) -> dt.datetime:
    """A TimestampType as a plain datetime, whose operators are C calls (celpy's are Python)."""
    return _dt_new(dt.datetime, *moment.__reduce__()[1])


def _plain_timedelta(delta: dt.timedelta) -> dt.timedelta:
    """A DurationType as a plain timedelta."""
    return dt.timedelta(delta.days, delta.seconds, delta.microseconds)


# Where `now` is surely a time datetime can hold (years 5 to 9987), so that _since_now may compare seconds.
_NOW_MIN: Final = -62_000_000_000.0
_NOW_MAX: Final = 253_000_000_000.0


_Generated = Callable[[Any, Any, float, bool], list[int]]


def _generate(rules: Sequence[_Rule]) -> tuple[_Generated | None, tuple[str, ...]]:
    """The rule set's generated function and the names of the rules it decides.

    The function takes (data, last, now, from_orjson) and returns the indices of the rules it did not find
    true: those are decided by the closures and celpy. None when no rule can be generated.
    """
    namespace: dict[str, Any] = {
        "_Fallback": _Fallback, "_MISSING": _MISSING, "_plain_json": _plain_json, "_NO_MAP": {},
        "_float_div": _float_div, "_timestamp_of": _timestamp_of, "_plain_datetime": _plain_datetime,
        "_rfc3339": _RFC3339.fullmatch, "_fromisoformat": dt.datetime.fromisoformat, "_CACHED_TEXT": 64,
        "_ISO_MARKS": "--T::.", "_ZULU": "Z", "_NEAR": 1e-3,
        "_NOW_MIN": _NOW_MIN, "_NOW_MAX": _NOW_MAX, "_CACHED_TEXTS": 4096, "_now": dt.datetime.fromtimestamp,
        "_UTC": _UTC, "_LAST_ISO": _LAST_ISO,
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
    checks = [f"    if not _plain_json({name}): return _EVERY[:]" for name in ("data", "last") if name in roots]
    if checks:
        # What orjson parsed always converts to CEL (only JSON's types, string keys, 64-bit integers, and no
        # deeper than _to_cel goes): other values are checked, and where they might not convert, the
        # closures and celpy decide every rule.
        prelude += ["if not from_orjson:", *checks]
    for name in ("data", "last"):
        if name in roots:
            prelude.append(f"{name}_map = {name} if type({name}) is dict else _NO_MAP")
    if any("now_ts" in line for line in body):
        prelude.append("now_ts = _now(now, _UTC)")  # the datetime of _fast_now's timestamp
    source = "\n".join(["def generated_rules(data, last, now, from_orjson=False):", *_indent(prelude),
                        *_indent(body), "    return slow", ""])
    try:
        exec(compile(source, "<byzguard rules>", "exec"), namespace)  # source from the config only
    except Exception:  # such as a rule set too large for the compiler: the closures serve it
        return None, ()
    function: _Generated = namespace["generated_rules"]
    function.__doc__ = source  # the generated source, for a reader in a debugger
    return function, tuple(generated)
