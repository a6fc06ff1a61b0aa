"""Specs refuse impossible values with a clear message; rendering is deterministic."""
import pytest

from epgen.jit import codegen
from epgen.jit.specs import (InternodeNotifySpec, LayoutSpec, LowLatencyBarrierSpec, LowLatencyCombineSpec,
                         LowLatencyDispatchSpec, NormalCombineSpec, NormalDispatchSpec, SpecError,
                         spec_from_json)


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
    (lambda: LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2,
                                    use_fp8=False, wire_format="fp4"), "wire_format", "fp4"),
    (lambda: LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2,
                                    wire_format="mxfp8"), "wire_format", "mxfp8"),
    (lambda: LowLatencyDispatchSpec(hidden=2896, num_topk=8, num_experts=288, num_ranks=2,
                                    use_fp8=False, wire_format="nvfp4"), "hidden", 2896),
    (lambda: LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2,
                                    recv_scale_layout="tiled"), "recv_scale_layout", "tiled"),
    (lambda: LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2,
                                    use_fp8=False, recv_scale_layout="deepgemm"),
     "recv_scale_layout", "deepgemm"),
    (lambda: LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2,
                                    use_fp8=False, wire_format="nvfp4",
                                    recv_scale_layout="deepgemm"), "recv_scale_layout", "deepgemm"),
    (lambda: LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2,
                                    recv_scale_layout="cutlass_128x4"),
     "recv_scale_layout", "cutlass_128x4"),
    (lambda: LayoutSpec(num_ranks=2, num_experts=64, num_topk="8"), "num_topk", "8"),
    (lambda: LowLatencyBarrierSpec(num_ranks=65), "num_ranks", 65),
    (lambda: InternodeNotifySpec(num_ranks=8, ranks_per_node=8, num_experts=64),
     "ranks_per_node", 8),
    (lambda: InternodeNotifySpec(num_ranks=8, ranks_per_node=2, num_experts=60),
     "num_experts", 60),
    (lambda: LayoutSpec(num_ranks=8, num_experts=64, num_topk=8, ranks_per_node=3),
     "ranks_per_node", 3),
    (lambda: LayoutSpec(num_ranks=8, num_experts=64, num_topk=8, ranks_per_node=8),
     "ranks_per_node", 8),
    (lambda: LowLatencyBarrierSpec(num_ranks=48, threads=32), "threads", 32),
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
    n = InternodeNotifySpec(num_ranks=4, ranks_per_node=2, num_experts=64)
    assert n.entry("notify").startswith("epgen::notify_") and "dispatch" not in n.name
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
    assert len(one.splitlines()) < 64      # the logic lives in headers, not in strings
    assert "static_assert(sizeof(LayoutArgs)" in one


def test_normal_dispatch_keys_rows_by_bytes_and_scale_columns():
    """The dispatch kernel moves bytes: rows of any element type key as the BF16 row of their
    width, 1-byte rows with scales as FP8 with that many 4-byte scale columns; the default
    column count (one per 128 channels) keeps the spec, and the key, it always had."""
    from epgen.jit.specs import normal_dispatch_spec, normal_dispatch_wire

    def spec(row_bytes, scale_cols):
        hidden, dtype = normal_dispatch_wire(row_bytes, scale_cols)
        return normal_dispatch_spec(hidden, 8, 64, 2, dtype, scale_cols or -1)
    bf16 = normal_dispatch_spec(4096, 8, 64, 2, "bf16")
    assert spec(2048 * 4, 0) == bf16          # float32 [T, 2048]
    assert spec(8192, 0) == bf16              # int8 [T, 8192] without scales
    fp8 = normal_dispatch_spec(7168, 8, 64, 2, "fp8")
    assert spec(7168, 56) == fp8              # float32 scales, one per 128 channels
    assert fp8.name == NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=64, num_ranks=2,
                                          dtype="fp8").name
    ue8m0 = spec(7168, 14)                    # int32 packed UE8M0: four groups per column
    assert ue8m0.dtype == "fp8" and ue8m0.num_scales == 14 and ue8m0.name != fp8.name
    with pytest.raises(SpecError, match="scale_cols=3"):
        NormalDispatchSpec(hidden=4096, num_topk=8, num_experts=64, num_ranks=2, scale_cols=3)
    with pytest.raises(SpecError, match="scale_cols=0"):
        NormalDispatchSpec(hidden=4096, num_topk=8, num_experts=64, num_ranks=2, dtype="fp8",
                           scale_cols=0)


def test_cached_normal_dispatch_canonicalises_experts_but_uncached_keeps_them():
    """A dispatch without top-k still sums per-expert counts (DeepEP's list), so it keeps its
    experts; only a cached dispatch (no counts) shares one kernel across expert counts."""
    from epgen.jit.specs import normal_dispatch_spec
    assert normal_dispatch_spec(4096, 0, 64, 4, "bf16").num_experts == 64
    assert normal_dispatch_spec(4096, 0, None, 4, "bf16").num_experts == 4


def test_ll_wire_format_field_keeps_existing_names_and_selects_the_cast():
    """wire_format defaults to "" (the flags' format): existing specs keep their names, and only
    a named format renders the template's FMT argument."""
    base = LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2)
    assert base.name == "ll_dispatch_fp8_h7168_k8_e288_r2_fd2750"      # as before wire_format
    assert "wire_format" not in base.rendered_fields()
    assert "enum : int { wire_format_code = 0 };" in codegen.render(base)
    for code, fmt in ((1, "mxfp8"), (2, "nvfp4")):
        s = LowLatencyDispatchSpec(hidden=2880, num_topk=8, num_experts=288, num_ranks=2,
                                   use_fp8=False, wire_format=fmt)
        assert s.name.startswith(f"ll_dispatch_{fmt}_h2880") and s.wire_format_code == code
        assert f"enum : int {{ wire_format_code = {code} }};" in codegen.render(s)
        assert spec_from_json(s.to_json()) == s


def test_ll_recv_scale_layout_field_keeps_existing_names_and_selects_the_map():
    """recv_scale_layout defaults to "" (DeepEP's): existing specs keep their names and fields;
    a named layout is its own kernel with the template's SFL argument."""
    base = LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2)
    assert base.name == "ll_dispatch_fp8_h7168_k8_e288_r2_fd2750"
    assert "recv_scale_layout" not in base.rendered_fields()
    assert "enum : int { recv_scale_layout_code = 0 };" in codegen.render(base)
    for code, layout, fmt in ((1, "deepgemm", ""), (1, "deepgemm", "mxfp8"),
                              (2, "cutlass_128x4", "mxfp8"), (2, "cutlass_128x4", "nvfp4")):
        s = LowLatencyDispatchSpec(hidden=2880, num_topk=8, num_experts=288, num_ranks=2,
                                   use_fp8=not fmt, wire_format=fmt, recv_scale_layout=layout)
        assert s.name.startswith(f"ll_dispatch_{fmt or 'fp8'}_{layout}_h2880")
        assert f"enum : int {{ recv_scale_layout_code = {code} }};" in codegen.render(s)
        assert spec_from_json(s.to_json()) == s


def test_layout_across_nodes_is_its_own_kernel_and_leaves_the_one_node_source_alone():
    one = LayoutSpec(num_ranks=8, num_experts=256, num_topk=8)
    nodes = LayoutSpec(num_ranks=8, num_experts=256, num_topk=8, ranks_per_node=2)
    src_one, src_nodes = codegen.render(one), codegen.render(nodes)
    # The field added later stays out of the one-node description and args (its kernel is the
    # one of before: the spec struct's ranks_per_node 0 is layout_kernel's default L).
    assert "ranks_per_node=" not in src_one and "LayoutNodesArgs" not in src_one
    assert "enum : int { ranks_per_node = 0 };" in src_one
    assert "ranks_per_node=2" in src_nodes and "enum : int { ranks_per_node = 2 };" in src_nodes
    assert "int* num_tokens_per_rdma_rank;" in src_nodes
    assert "static_assert(sizeof(LayoutNodesArgs)" in src_nodes
    assert nodes.name != one.name and "_n4_" in nodes.name
    assert spec_from_json(nodes.to_json()) == nodes
