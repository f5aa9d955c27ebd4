"""RFC 8785 canonicalization: known answers, a differential test against `rfc8785`, and the edge cases."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import json
import math
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import rfc8785
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byzguard import jcs
from byzguard.errors import ByzguardError
from byzguard.jcs import CanonicalizationError, canonicalize, canonicalize_json

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "jcs"
VECTOR_NAMES = sorted(p.name for p in (VECTORS / "input").glob("*.json"))
MAX_SAFE = 2**53 - 1


# --- known answers ----------------------------------------------------------------------------------------


def test_vectors_present() -> None:
    """The known-answer folder holds its six vectors, so the parametrized test cannot pass vacuously."""
    assert len(VECTOR_NAMES) >= 6
    assert all((VECTORS / "output" / name).is_file() for name in VECTOR_NAMES)


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_known_answer_vectors(name: str) -> None:
    """Each reference input canonicalizes to exactly the reference output bytes."""
    expected = (VECTORS / "output" / name).read_bytes()
    expected = expected.removesuffix(b"\n")
    assert canonicalize_json((VECTORS / "input" / name).read_bytes()) == expected


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_known_answer_vectors_slow_path(name: str) -> None:
    """The pure-Python path, taken for unusual input and when orjson misbehaves, also meets the vectors."""
    expected = (VECTORS / "output" / name).read_bytes().removesuffix(b"\n")
    assert jcs._canonicalize_slow(orjson.loads((VECTORS / "input" / name).read_bytes())) == expected


# --- differential test against rfc8785 --------------------------------------------------------------------

# Characters that decide UTF-16 against code point order (U+E000..U+FFFF against astral), controls that
# need escaping and a few ordinary ones, mixed with any non-surrogate character.
special_chars = st.sampled_from(
    ["a", "b", "\x00", "\x1f", '"', "\\", "\x7f", "\u2028", "\u00e9", "\ue000", "\uffff", "\U00010000",
     "\U0001f600", "\U0010ffff"]
)
any_chars = st.characters(max_codepoint=0x10FFFF, exclude_categories=["Cs"])
any_chars_mixed = st.one_of(special_chars, any_chars)
texts = st.text(alphabet=any_chars_mixed, max_size=5)
# Short keys over the special characters alone make sibling keys that UTF-16 and code points order
# differently common enough to matter.
keys = st.one_of(st.text(alphabet=special_chars, max_size=3), st.text(alphabet=any_chars_mixed, max_size=4))

floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True),
    st.floats(min_value=1e-9, max_value=1e-3),  # around the 1e-6 / 1e-7 switch to exponent form
    st.floats(min_value=1e14, max_value=1e23),  # around 2**53, 1e16 and the 1e21 switch
    st.floats(min_value=-1e6, max_value=1e6).map(lambda f: round(f, 2)),  # price-like
    st.integers(-(2**60), 2**60).map(float),  # integral floats, the "100.0" case
    st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
                     1e-6, 1e-7, 1e20, 1e21, 2.0**53, 1e16, 1e-5, 9.999999999999999e-06]),
)
safe_ints = st.one_of(st.integers(-1000, 1000), st.integers(-MAX_SAFE, MAX_SAFE),
                      st.sampled_from([MAX_SAFE, -MAX_SAFE, 0]))
scalars = st.one_of(st.none(), st.booleans(), safe_ints, floats, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(keys, children, max_size=6),
    ),
    max_leaves=12,
)


def has_unsafe_int(value: Any) -> bool:
    """Whether a parsed JSON value holds an int beyond +-(2**53 - 1)."""
    if isinstance(value, dict):
        return any(has_unsafe_int(v) for v in value.values())
    if isinstance(value, list):
        return any(has_unsafe_int(v) for v in value)
    return type(value) is int and abs(value) > MAX_SAFE


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_matches_rfc8785(value: Any) -> None:
    """Any JSON value canonicalizes to the rfc8785 package's bytes, directly, via JSON text, and idempotently."""
    expected = rfc8785.dumps(value)
    assert canonicalize(value) == expected
    assert jcs._canonicalize_slow(value) == expected
    # orjson text keeps astral characters raw; json.dumps escapes them as surrogate pairs: both must parse.
    assert canonicalize_json(orjson.dumps(value)) == expected
    assert canonicalize_json(json.dumps(value).encode()) == expected
    if has_unsafe_int(orjson.loads(expected)):
        # A float from 2**53 to 1e21 is written as an integer literal; orjson reads it back as an int when it
        # fits 64 bits, and that int is refused (see test_big_integral_float_output_does_not_reparse).
        with pytest.raises(CanonicalizationError, match="safe range"):
            canonicalize_json(expected)
    else:
        assert canonicalize_json(expected) == expected


@settings(max_examples=3000, deadline=None)
@given(st.one_of(floats, safe_ints))
def test_numbers_match_rfc8785(number: float) -> None:
    """Every finite float and safe integer is written as rfc8785 writes it, alone and as a member."""
    expected = rfc8785.dumps(number)
    assert canonicalize(number) == expected
    assert canonicalize({"n": [number]}) == b'{"n":[' + expected + b"]}"
    assert canonicalize_json(orjson.dumps(number)) == expected


# --- numbers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (100.0, b"100"),
        (1e20, b"100000000000000000000"),
        (1e21, b"1e+21"),
        (1.5e21, b"1.5e+21"),
        (1e-6, b"0.000001"),
        (1e-7, b"1e-7"),
        (1.25e-7, b"1.25e-7"),
        (-0.0, b"0"),
        (0.0, b"0"),
        (5e-324, b"5e-324"),
        (-5e-324, b"-5e-324"),
        (1.7976931348623157e308, b"1.7976931348623157e+308"),
        (2.0**53, b"9007199254740992"),
        (2.0**60, b"1152921504606847000"),
        (1e16, b"10000000000000000"),
        (123456789012345680000.0, b"123456789012345680000"),
        (0.1, b"0.1"),
        (-129.99, b"-129.99"),
        (1e-5, b"0.00001"),
        (333333333.33333329, b"333333333.3333333"),
        (MAX_SAFE, b"9007199254740991"),
        (-MAX_SAFE, b"-9007199254740991"),
    ],
)
def test_number_formatting(value: float, expected: bytes) -> None:
    """Numbers are written as ECMAScript's Number.prototype.toString writes them, alone and inside containers."""
    assert canonicalize(value) == expected
    assert canonicalize([value]) == b"[" + expected + b"]"
    assert canonicalize({"k": value}) == b'{"k":' + expected + b"}"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_refused(value: float) -> None:
    """NaN and the infinities have no JSON form and are refused wherever they sit."""
    for wrapped in (value, [1, value], {"a": {"b": value}}):
        with pytest.raises(CanonicalizationError):
            canonicalize(wrapped)


@pytest.mark.parametrize("value", [2**53, -(2**53), 2**63, 10**21, 2**64 - 1])
def test_unsafe_integers_refused(value: int) -> None:
    """Integers beyond +-(2**53 - 1) are refused, as rfc8785 does, rather than rounded like a double."""
    with pytest.raises(rfc8785.IntegerDomainError):
        rfc8785.dumps(value)
    for wrapped in (value, [value], {"n": value}):
        with pytest.raises(CanonicalizationError, match="safe range"):
            canonicalize(wrapped)


def test_unsafe_integer_in_json_text_refused() -> None:
    """An integer literal that orjson parses as an int above 2**53 is refused, not silently rounded."""
    with pytest.raises(CanonicalizationError):
        canonicalize_json(b'{"id": 9007199254740993}')
    # orjson parses integers beyond 64 bits as doubles, which JCS writes in ECMAScript form.
    assert canonicalize_json(b"[100000000000000000000000]") == b"[1e+23]"


def test_big_integral_float_output_does_not_reparse() -> None:
    """JCS writes 2.0**53 as an integer literal; read back it is an int beyond the safe range and refused.

    This is rfc8785's integer policy (refuse, never round), kept deliberately: it also refuses such
    literals from producers that meant a double, e.g. JavaScript's JSON.stringify(2 ** 53).
    """
    assert canonicalize(2.0**53) == b"9007199254740992"
    with pytest.raises(CanonicalizationError, match="safe range"):
        canonicalize_json(b"9007199254740992")
    assert canonicalize_json(b"9007199254740992.0") == b"9007199254740992"


def test_floats_without_orjson_fast_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the orjson probe rejects its float format, every float takes the Python formatter with equal bytes."""
    monkeypatch.setattr(jcs, "_PLAIN_MIN", math.inf)
    monkeypatch.setattr(jcs, "_PLAIN_MAX", 0.0)
    value = {"p": [0.1, 129.99, -2.5e-5, 1 / 3, 1e15 + 0.5, 100.0, 1e-7]}
    assert canonicalize(value) == rfc8785.dumps(value)


def test_slow_path_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the orjson probe rejects its string format, canonicalize uses only the Python path, with equal bytes."""
    monkeypatch.setattr(jcs, "_FAST", False)
    value = {"s": "\x00\x1f\"\\\u2028", "n": [1, 2.5, 100.0, None, True], "\U0001f600": {}, "\ue000": []}
    assert canonicalize(value) == rfc8785.dumps(value)


# --- keys -------------------------------------------------------------------------------------------------


def test_keys_sorted_by_utf16_code_units() -> None:
    """An astral key sorts before a U+E000 key: its high surrogate D83D is below E000 (code points disagree)."""
    value = {"\ue000": 1, "\U0001f600": 2, "a": 3, "\uffff": 4}
    expected = '{"a":3,"\U0001f600":2,"\ue000":1,"\uffff":4}'.encode()
    assert canonicalize(value) == expected
    assert rfc8785.dumps(value) == expected


def test_nested_keys_sorted_by_utf16_code_units() -> None:
    """UTF-16 ordering also applies to objects nested in arrays and objects, not just the top level."""
    value = [{"x": {"\ue000": 1, "\U0001f600": 2}}]
    assert canonicalize(value) == '[{"x":{"\U0001f600":2,"\ue000":1}}]'.encode()


def test_astral_values_keep_code_point_free_keys() -> None:
    """An astral character in a value only (no key conflict) canonicalizes the same as rfc8785 does."""
    value = {"b": "\U0001f600", "a": ["\ue000", "\U0010ffff"]}
    assert canonicalize(value) == rfc8785.dumps(value)


@pytest.mark.parametrize("value", [{1: "a"}, {None: 1}, {b"k": 1}, {(1,): 2}, [{"ok": {2.5: 1}}]])
def test_non_string_keys_refused(value: Any) -> None:
    """Object keys must be strings; anything else is refused with CanonicalizationError."""
    with pytest.raises(CanonicalizationError, match="keys must be strings"):
        canonicalize(value)


# --- strings ------------------------------------------------------------------------------------------------


def test_string_escaping() -> None:
    """Only quote, backslash and C0 controls are escaped (short forms or lowercase \\u00xx); the rest is raw UTF-8."""
    value = "".join(map(chr, range(0x20))) + '"\\/\x7f\u2028\u2029\u00e9\ufeff\U0001f600'
    expected = (
        b'"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r\\u000e\\u000f'
        b"\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018\\u0019\\u001a\\u001b\\u001c"
        b'\\u001d\\u001e\\u001f\\"\\\\/' + "\x7f\u2028\u2029\u00e9\ufeff\U0001f600".encode() + b'"'
    )
    assert canonicalize(value) == expected
    assert jcs._canonicalize_slow(value) == expected
    assert rfc8785.dumps(value) == expected


@pytest.mark.parametrize("value", ["\ud800", "a\udfffb", {"\ud83d": 1}, ["ok", {"k": "x\udc00"}]])
def test_lone_surrogates_refused(value: Any) -> None:
    """A lone surrogate has no UTF-8 form, so a string or key holding one is refused, as rfc8785 does."""
    with pytest.raises(ValueError):  # rfc8785 raises its CanonicalizationError or UnicodeEncodeError
        rfc8785.dumps(value)
    with pytest.raises(CanonicalizationError, match="surrogate"):
        canonicalize(value)


@pytest.mark.parametrize("raw", [b'"\\ud800"', b'"\\udc00"', b'{"\\ud83dx": 1}'])
def test_lone_surrogate_escapes_in_json_refused(raw: bytes) -> None:
    """JSON text escaping a lone surrogate is refused at parse time; a valid escaped pair is accepted."""
    with pytest.raises(CanonicalizationError):
        canonicalize_json(raw)
    assert canonicalize_json(b'"\\ud83d\\ude00"') == '"\U0001f600"'.encode()


# --- types and errors ---------------------------------------------------------------------------------------


class Colour(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


def test_subclasses_and_tuples_as_rfc8785() -> None:
    """Subclasses of JSON types serialize as their base value and tuples as arrays, as in rfc8785."""
    value = {"c": Colour.RED, "l": Level.HIGH, "t": (1, 2.5), "o": collections.OrderedDict(b=1, a=2),
             Colour.RED: "key"}
    assert canonicalize(value) == rfc8785.dumps(value)
    assert canonicalize(value) == b'{"c":"red","l":3,"o":{"a":2,"b":1},"red":"key","t":[1,2.5]}'


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        b"bytes",
        decimal.Decimal("1.5"),
        datetime.datetime(2024, 1, 1),
        uuid.UUID(int=0),
        orjson.Fragment(b'"raw"'),
        object(),
        {"nested": [frozenset()]},
        enum.Enum("Plain", "A").A,
    ],
)
def test_unsupported_types_refused(value: Any) -> None:
    """Types JSON does not have are refused even where orjson would serialize them (UUID, datetime, Fragment)."""
    with pytest.raises(CanonicalizationError, match="unsupported type"):
        canonicalize(value)


def test_error_is_byzguard_value_error() -> None:
    """CanonicalizationError is both a ByzguardError and a ValueError, so either kind of handler catches it."""
    assert issubclass(CanonicalizationError, ByzguardError)
    assert issubclass(CanonicalizationError, ValueError)


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,]", b"NaN", b"1e400", b'{"a":1}x', b"\xff"])
def test_invalid_json_refused(raw: bytes) -> None:
    """JSON text that orjson cannot parse raises CanonicalizationError, not orjson's own exception."""
    with pytest.raises(CanonicalizationError, match="not valid JSON"):
        canonicalize_json(raw)


def test_deep_nesting_beyond_orjson() -> None:
    """Nesting deeper than orjson writes (255) still canonicalizes; beyond Python's recursion it is refused."""
    depth = 200  # 400 nested containers
    value: Any = 1.0
    for _ in range(depth):
        value = {"a": [value]}
    assert canonicalize(value) == b'{"a":[' * depth + b"1" + b"]}" * depth
    raw = b"[" * 500 + b"]" * 500
    assert canonicalize_json(raw) == raw
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(CanonicalizationError, match="nested too deeply"):
        canonicalize(deep)


def test_input_not_mutated() -> None:
    """Rewriting floats for orjson works on copies: the caller's value is left as it was."""
    value = {"p": 100.0, "l": [1e21, {"z": -0.0}], "s": "x"}
    snapshot = repr(value)
    assert canonicalize(value) == b'{"l":[1e+21,{"z":0}],"p":100,"s":"x"}'
    assert repr(value) == snapshot


def test_top_level_scalars() -> None:
    """A bare scalar is valid JSON text and canonicalizes on its own."""
    assert canonicalize(None) == b"null"
    assert canonicalize(True) == b"true"
    assert canonicalize(False) == b"false"
    assert canonicalize("x") == b'"x"'
    assert canonicalize(0) == b"0"
    assert canonicalize({}) == b"{}"
    assert canonicalize([]) == b"[]"
