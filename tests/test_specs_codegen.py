"""Specs refuse impossible values with a clear message; rendering is deterministic."""
import pytest

from epgen import codegen
from epgen.specs import (LayoutSpec, LowLatencyCombineSpec, LowLatencyDispatchSpec,
                         NormalCombineSpec, NormalDispatchSpec, SpecError, spec_from_json)


@pytest.mark.parametrize("make, field, value", [
    (lambda: NormalDispatchSpec(hidden=7172, num_topk=8, num_experts=256, num_ranks=2), "hidden", 7172),
    (lambda: NormalDispatchSpec(hidden=7176, num_topk=8, num_experts=256, num_ranks=2, dtype="fp8"),
     "hidden", 7176),
    (lambda: NormalDispatchSpec(hidden=7168, num_topk=33, num_experts=256, num_ranks=2), "num_topk", 33),
    (lambda: NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=255, num_ranks=2),
     "num_experts", 255),
    (lambda: NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=256, num_ranks=16),
     "num_ranks", 16),
    (lambda: NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=256, num_ranks=2, dtype="fp16"),
     "dtype", "fp16"),
    (lambda: NormalCombineSpec(hidden=7168, num_topk=8, num_ranks=2, num_biases=3), "num_biases", 3),
    (lambda: LowLatencyDispatchSpec(hidden=7160, num_topk=8, num_experts=288, num_ranks=2),
     "hidden", 7160),
    (lambda: LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2,
                                    use_ue8m0=True), "use_ue8m0", True),
    (lambda: LowLatencyCombineSpec(hidden=2880, num_topk=0, num_experts=64, num_ranks=2),
     "num_topk", 0),
    (lambda: LayoutSpec(num_ranks=2, num_experts=64, num_topk="8"), "num_topk", "8"),
])
def test_impossible_specs_name_field_value_rule(make, field, value):
    with pytest.raises(SpecError) as e:
        make()
    msg = str(e.value)
    assert f".{field}=" in msg and repr(value) in msg and ":" in msg


def test_shapes_deepep_cannot_do_are_valid():
    NormalDispatchSpec(hidden=2880, num_topk=16, num_experts=128, num_ranks=8, dtype="fp8")
    LowLatencyDispatchSpec(hidden=2880, num_topk=32, num_experts=64, num_ranks=4)
    LowLatencyCombineSpec(hidden=3584, num_topk=16, num_experts=384, num_ranks=8)


def test_entry_names_follow_design():
    d = NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=256, num_ranks=2)
    assert d.entry().startswith("epgen::dispatch_")
    assert d.entry("notify").startswith("epgen::notify_")
    assert "dispatch" not in d.kernel_name("notify") and "combine" not in d.kernel_name("notify")
    assert NormalCombineSpec(hidden=7168, num_topk=8, num_ranks=2).entry().startswith("epgen::combine_")
    assert LayoutSpec(num_ranks=2, num_experts=64, num_topk=8).entry().startswith("epgen::layout_")
    with pytest.raises(KeyError):
        d.kernel_name("combine")


def test_tag_distinguishes_every_field_and_defaults_are_not_rendered():
    a = NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=256, num_ranks=2)
    b = NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=256, num_ranks=2, threads=512)
    assert a.name != b.name
    assert "threads" not in a.rendered_fields() and b.rendered_fields()["threads"] == 512
    assert spec_from_json(a.to_json()) == a


def test_rendering_is_deterministic_and_small():
    spec = LayoutSpec(num_ranks=4, num_experts=256, num_topk=8)
    one, two = codegen.render(spec), codegen.render(LayoutSpec(num_ranks=4, num_experts=256, num_topk=8))
    assert one == two
    assert spec.kernel_name() in one and '#include "layout.cuh"' in one
    assert len(one.splitlines()) < 40      # the logic lives in headers, not in strings
    assert "static_assert(sizeof(LayoutArgs)" in one
