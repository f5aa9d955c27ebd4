"""RFC 8785 JSON Canonicalization Scheme (JCS): the bytes that structured-mode checksums cover.

JCS writes keys sorted by UTF-16 code units, no whitespace, strings escaped only for `"`, `\\` and
control characters, and numbers as ECMAScript's `Number.prototype.toString` does. Behaviour matches the
`rfc8785` package, which the tests use as the reference: integers outside +-(2**53 - 1) are refused
rather than rounded (two different integers must never share a checksum), as are NaN, infinities,
non-string keys, lone surrogates and types that JSON does not have; every refusal is a
CanonicalizationError.

Checksums run on every structured event, so there are two paths:

- fast: orjson with OPT_SORT_KEYS already writes JCS for strings, ints, bools, null and most floats. A
  walk rewrites only the floats orjson writes differently (`100.0`, `1e+20`, `1e-6`, `-0.0`, ...) and
  checks integer ranges, copying a container only when something under it changed;
- slow: a plain Python serializer for what the fast path does not take on: subclasses, tuples, non-string
  keys, objects whose keys need true UTF-16 ordering (only possible when the output holds a character
  above U+FFFF), nesting deeper than orjson allows, and every invalid input (it raises the error).
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

import orjson

from byzguard.errors import ByzguardError

__all__ = ["CanonicalizationError", "canonicalize", "canonicalize_json", "js_sorted", "js_stringify"]


class CanonicalizationError(ByzguardError, ValueError):
    """The value has no JCS form (NaN or infinity, unsafe integer, non-string key, lone surrogate, ...)."""


_MAX_SAFE_INT: Final = 2**53 - 1
_TWO_53: Final = 2.0**53
_NONE_TYPE: Final = type(None)

# UTF-8 lead bytes of the characters above U+FFFF: the only ones whose code point order differs from
# UTF-16 code unit order (a surrogate pair sorts below U+E000..U+FFFF), so only they force the slow path.
_ASTRAL_LEAD: Final = re.compile(rb"[\xf0-\xf4]")

# RFC 8785 3.2.2.2: the two-character escapes where JSON has them, \u00xx (lowercase) for other controls.
_STRING_ESCAPES: Final[dict[int, str]] = {i: f"\\u{i:04x}" for i in range(0x20)} | {
    ord('"'): '\\"',
    ord("\\"): "\\\\",
    ord("\b"): "\\b",
    ord("\t"): "\\t",
    ord("\n"): "\\n",
    ord("\f"): "\\f",
    ord("\r"): "\\r",
}


def _format_float(f: float) -> str:
    """Write a float as ECMAScript Number.prototype.toString does (RFC 8785 3.2.2.3)."""
    if math.isnan(f) or math.isinf(f):
        raise CanonicalizationError(f"{f!r} is not representable in JCS")
    if f == 0.0:
        return "0"  # ECMAScript writes -0 as "0" too
    # repr gives the shortest round-tripping digits, closest to the value: the digits ECMAScript picks.
    r = repr(f)
    if "e" not in r:
        # repr is positional for 1e-4 <= |f| < 1e16, where ECMAScript is too; only integral ".0" differs.
        return r[:-2] if r.endswith(".0") else r
    mantissa, _, exponent = r.partition("e")
    sign = ""
    if mantissa[0] == "-":
        sign, mantissa = "-", mantissa[1:]
    digits = mantissa.replace(".", "")
    k = len(digits)
    n = int(exponent) + 1  # ECMAScript's n: the value is 0.DIGITS * 10**n
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return f"{sign}{digits[:n]}.{digits[n:]}"
    if -6 < n <= 0:
        return f"{sign}0.{'0' * -n}{digits}"
    fraction = "." + digits[1:] if k > 1 else ""
    return f"{sign}{digits[0]}{fraction}e{'+' if n > 0 else '-'}{abs(n - 1)}"


def _encode_string(s: str) -> bytes:
    """Write a string as RFC 8785 3.2.2.2 does, without relying on orjson."""
    try:
        return b'"' + s.translate(_STRING_ESCAPES).encode("utf-8") + b'"'
    except UnicodeEncodeError as exc:
        raise CanonicalizationError("string holds a lone surrogate, which has no UTF-8 form") from exc


def _unsafe_int(n: int) -> CanonicalizationError:
    return CanonicalizationError(f"integer {n} is outside the IEEE 754 double safe range +-(2**53 - 1)")


def _orjson_writes_jcs() -> tuple[bool, bool]:
    """Probe the installed orjson: (strings as JCS, floats in [1e-5, 1e16) as ECMAScript)."""
    text = "".join(map(chr, range(0x20))) + '"\\/\x7f\u2028\u2029\ufeff\uffff\u00e9\U0001f600'
    strings = orjson.dumps(text) == _encode_string(text)
    probes = (1e-5, 1.0000000000000003e-05, 2.5e-5, 1 / 3, 0.1, 0.5, 123456.789, 1e15 + 0.5, 2**52 - 0.5)
    floats = all(orjson.dumps(p) == _format_float(p).encode() for x in probes for p in (x, -x))
    return strings, floats


# A newer orjson that wrote numbers or strings differently must cost speed, never correctness: without
# its strings the fast path is off, without its floats every float gets the Python formatter.
_FAST, _floats_ok = _orjson_writes_jcs()
_PLAIN_MIN: Final = 1e-5 if _floats_ok else math.inf
_PLAIN_MAX: Final = 1e16 if _floats_ok else 0.0


class _Unusual(Exception):
    """The fast path met a value it leaves to the slow path (subclass, tuple, unsupported type)."""


def _float_value(x: float) -> object:
    """The replacement for a float that orjson would not write as JCS: an int, or a preformatted Fragment."""
    if -_TWO_53 < x < _TWO_53 and x.is_integer():
        # Below 2**53 an integral float's exact digits are its shortest ones; this also folds -0.0 to 0.
        return int(x)
    return orjson.Fragment(_format_float(x))


# One loop serves dicts (over items()) and lists (over enumerate()): both copy with .copy() and assign
# by key or index. The body stays inline: it is the hot path, and a per-value helper call would cost more
# than the rest of the work for a typical event.
def _prepare(c: Any, pairs: Any) -> Any:
    new: Any = None
    for k, x in pairs:
        t = type(x)
        if t is str:
            continue
        if t is float:
            if (_PLAIN_MIN <= x < _PLAIN_MAX or -_PLAIN_MAX < x <= -_PLAIN_MIN) and not x.is_integer():
                continue
            y = _float_value(x)
        elif t is int:
            if -_MAX_SAFE_INT <= x <= _MAX_SAFE_INT:
                continue
            raise _unsafe_int(x)
        elif t is bool or t is _NONE_TYPE:
            continue
        elif t is dict:
            y = _prepare(x, x.items())
            if y is x:
                continue
        elif t is list:
            y = _prepare(x, enumerate(x))
            if y is x:
                continue
        else:
            raise _Unusual
        if new is None:
            new = c.copy()
        new[k] = y
    return c if new is None else new


def _prepare_list(v: list[Any]) -> list[Any]:
    out: list[Any] = _prepare(v, enumerate(v))
    return out


def _emit(v: object, out: list[bytes]) -> None:
    # isinstance, not type(): subclasses (IntEnum, str enums, OrderedDict) serialize as their base value,
    # as in rfc8785; bool comes before int because it is one.
    if v is None:
        out.append(b"null")
    elif isinstance(v, bool):
        out.append(b"true" if v else b"false")
    elif isinstance(v, int):
        n = int(v)
        if not -_MAX_SAFE_INT <= n <= _MAX_SAFE_INT:
            raise _unsafe_int(n)
        out.append(b"%d" % n)
    elif isinstance(v, str):
        out.append(_encode_string(v))
    elif isinstance(v, float):
        out.append(_format_float(float(v)).encode())
    elif isinstance(v, list | tuple):
        out.append(b"[")
        for i, x in enumerate(v):
            if i:
                out.append(b",")
            _emit(x, out)
        out.append(b"]")
    elif isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise CanonicalizationError("object keys must be strings")
        # surrogatepass: a lone surrogate must reach _encode_string, which names the problem.
        items = sorted(v.items(), key=lambda kv: kv[0].encode("utf-16-be", "surrogatepass"))
        out.append(b"{")
        for i, (k, x) in enumerate(items):
            if i:
                out.append(b",")
            out.append(_encode_string(k))
            out.append(b":")
            _emit(x, out)
        out.append(b"}")
    else:
        raise CanonicalizationError(f"unsupported type for JCS: {type(v).__name__}")


def _canonicalize_slow(value: object) -> bytes:
    """The reference path: plain Python, exact UTF-16 key order, and the errors for invalid input."""
    out: list[bytes] = []
    try:
        _emit(value, out)
    except RecursionError as exc:
        raise CanonicalizationError("value is nested too deeply to canonicalize") from exc
    return b"".join(out)


def canonicalize(value: object) -> bytes:
    """Return the RFC 8785 (JCS) bytes of a parsed JSON value; raise CanonicalizationError if it has none."""
    if not _FAST:
        return _canonicalize_slow(value)
    try:
        if type(value) is dict:
            prepared: object = _prepare(value, value.items())
        elif type(value) is list:
            prepared = _prepare_list(value)
        else:
            prepared = _prepare_list([value])[0]
        out = orjson.dumps(prepared, option=orjson.OPT_SORT_KEYS)
    except (_Unusual, orjson.JSONEncodeError, RecursionError):
        # orjson refuses non-string keys, lone surrogates and deep nesting; the slow path either handles
        # the value or raises the precise error.
        return _canonicalize_slow(value)
    if not out.isascii() and _ASTRAL_LEAD.search(out) is not None:
        return _canonicalize_slow(value)
    return out


def canonicalize_json(raw: bytes) -> bytes:
    """Parse JSON text with orjson and return its JCS bytes; raise CanonicalizationError if either fails."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CanonicalizationError(f"not valid JSON: {exc}") from exc
    return canonicalize(value)


# -- JavaScript serializations: what producers that do not implement RFC 8785 hash instead ---------------
# Only the integrity check's failure path uses them, to name the form a failing checksum was made in.

_ARRAY_INDEX_MAX: Final = 2**32 - 2


def _array_index(key: str) -> int | None:
    """The integer a JavaScript object enumerates `key` as (an array index: canonical "0".."4294967294")."""
    if key.isascii() and key.isdigit() and (key == "0" or key[0] != "0"):
        n = int(key)
        if n <= _ARRAY_INDEX_MAX:
            return n
    return None


def _js_order(items: list[tuple[str, Any]], *, sort: bool) -> list[tuple[str, Any]]:
    """A JavaScript object's own-key order: array indices ascending, then the other keys in insertion order
    (sorted by UTF-16 code units first when `sort`, as `Object.keys(o).sort()` inserts them)."""
    if sort:
        items = sorted(items, key=lambda kv: kv[0].encode("utf-16-be", "surrogatepass"))
    indexed = [(n, kv) for kv in items if (n := _array_index(kv[0])) is not None]
    if not indexed:
        return items
    indexed.sort(key=lambda p: p[0])
    return [kv for _, kv in indexed] + [kv for kv in items if _array_index(kv[0]) is None]


def _emit_js(v: object, out: list[bytes], sort: bool) -> None:
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise CanonicalizationError("object keys must be strings")
        out.append(b"{")
        for i, (k, x) in enumerate(_js_order(list(v.items()), sort=sort)):
            if i:
                out.append(b",")
            out.append(_encode_string(k))
            out.append(b":")
            _emit_js(x, out, sort)
        out.append(b"}")
    elif isinstance(v, list | tuple):
        out.append(b"[")
        for i, x in enumerate(v):
            if i:
                out.append(b",")
            _emit_js(x, out, sort)
        out.append(b"]")
    else:
        _emit(v, out)  # scalars are written as RFC 8785 (and JSON.stringify) write them


def _js(value: object, sort: bool) -> bytes:
    out: list[bytes] = []
    try:
        _emit_js(value, out, sort)
    except RecursionError as exc:
        raise CanonicalizationError("value is nested too deeply to serialize") from exc
    return b"".join(out)


def js_sorted(value: object) -> bytes:
    """`JSON.stringify` of a value whose keys were sorted recursively (`Object.keys(o).sort()`), as hand-written
    JavaScript canonicalizers do: RFC 8785 except that integer-like keys come first, in numeric order."""
    return _js(value, True)


def js_stringify(value: object) -> bytes:
    """`JSON.stringify(value)` of a value parsed from JSON: keys in the order received (array indices first)."""
    return _js(value, False)
