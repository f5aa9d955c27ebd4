"""The benchmark's variants: a setting a variant's kind cannot apply is refused, not silently ignored."""

import pytest

from bench.variants import VARIANTS, Variant


def test_a_switch_interval_on_a_byzguard_variant_is_kept() -> None:
    assert VARIANTS["c_switch1"].switch_interval_ms == 1


@pytest.mark.parametrize("kind", ["raw", "faust", "batch"])
def test_a_switch_interval_on_another_kind_is_refused(kind: str) -> None:
    with pytest.raises(ValueError, match="only applied to byzguard workers"):
        Variant("x", "x", kind, "at_least_once", switch_interval_ms=1)
