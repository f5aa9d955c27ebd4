"""The benchmark's variants: a wrapper a variant's kind cannot apply is refused, not silently ignored."""

import pytest

from bench.variants import VARIANTS, Variant


def test_a_wrapper_on_a_byzguard_variant_is_kept() -> None:
    assert VARIANTS["c_switch1"].wrapper == ("bench.switched", "1")


@pytest.mark.parametrize("kind", ["raw", "faust", "batch"])
def test_a_wrapper_on_another_kind_is_refused(kind: str) -> None:
    with pytest.raises(ValueError, match="only applied to byzguard workers"):
        Variant("x", "x", kind, "at_least_once", wrapper=("bench.switched", "1"))
