"""How rule outcomes are worded: celpy's errors as one bounded line, and the values a violation quotes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import lark
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError

from byzguard.rules.environment import _path

_DETAIL_VALUES: Final = 4
_DETAIL_VALUE_CHARS: Final = 60
_ERROR_CHARS: Final = 300


# --- reporting ----------------------------------------------------------------------------------------

_CLASS_RE: Final = re.compile(r"<class '(?:celpy\.celtypes\.)?(\w+?)(?:Type)?'>")
_TOKEN_RE: Final = re.compile(r"Token\('RULE', '(\w+)'\)")
_ACTIVATION_RE: Final = re.compile(r" \(in activation .*", re.DOTALL)
_GENERIC_ERRORS: Final = frozenset(
    {"return error for overflow", "no such overload", "evaluation error", "invalid_argument",
     "modulus or divide by zero"}
)


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


def _syntax_error(expr: str, exc: CELParseError) -> str:
    """One line saying where the expression stops parsing (celpy's own message is a multi-line caret)."""
    if exc.line is None or exc.column is None:
        return f"CEL syntax error in {expr!r}: {' '.join(str(exc.args[0]).split()) if exc.args else exc}"
    lines = expr.splitlines() or [""]
    rest = lines[exc.line - 1][exc.column - 1 :].strip() if exc.line <= len(lines) else ""
    near = f"near {rest[:20]!r}" if rest else "at the end"
    return f"CEL syntax error at line {exc.line}, column {exc.column} ({near}) in {expr!r}"
