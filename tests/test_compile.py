"""Every kernel family compiles with the real NVRTC + nvJitLink (+ libnvshmem_device.a) for
sm_90, at DeepSeek's shapes and at shapes DeepEP cannot do (hidden 2880 / 3584, top-k 16)."""
import os
import time

import pytest

from epgen import formats, jit
from epgen.jit import specs
from epgen.cache import Cache
from epgen.jit.compiler import CompileError
from epgen.jit.specs import (InternodeCombineSpec, InternodeDispatchSpec, InternodeNotifySpec, LayoutSpec, LowLatencyBarrierSpec,
                         LowLatencyCombineSpec, LowLatencyCombineRankSpec, LowLatencyDispatchSpec,
                         NormalCombineSpec,
                         NormalDispatchSpec)

SPECS = [
    LayoutSpec(num_ranks=8, num_experts=256, num_topk=8),
    LayoutSpec(num_ranks=2, num_experts=384, num_topk=16),
    LayoutSpec(num_ranks=8, num_experts=256, num_topk=8, ranks_per_node=2),     # 4 nodes
    LayoutSpec(num_ranks=64, num_experts=256, num_topk=16, ranks_per_node=32),  # 2 nodes of 32
    NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=256, num_ranks=2, dtype="bf16"),
    NormalDispatchSpec(hidden=2880, num_topk=16, num_experts=128, num_ranks=4, dtype="fp8"),
    NormalDispatchSpec(hidden=3584, num_topk=0, num_experts=384, num_ranks=8, dtype="bf16"),
    # 1-byte rows with int32 packed UE8M0 scales (ceil(56 / 4) columns), DeepEP's other format
    NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=256, num_ranks=4, dtype="fp8",
                       scale_cols=14),
    NormalCombineSpec(hidden=7168, num_topk=8, num_ranks=2),
    NormalCombineSpec(hidden=2880, num_topk=16, num_ranks=8, num_biases=2),
    LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2),
    LowLatencyDispatchSpec(hidden=2880, num_topk=16, num_experts=128, num_ranks=4,
                           round_scale=True, use_ue8m0=True),
    LowLatencyDispatchSpec(hidden=3584, num_topk=16, num_experts=384, num_ranks=8, use_fp8=False),
    # the in-kernel MXFP8 / NVFP4 casts at DeepSeek's, a 4096 and gpt-oss's 2880 hidden
    *(LowLatencyDispatchSpec(hidden=h, num_topk=8, num_experts=64, num_ranks=8, use_fp8=False,
                             wire_format=f) for f in ("mxfp8", "nvfp4") for h in (7168, 4096, 2880)),
    # the received-scale layouts (formats.RECV_SCALE_LAYOUTS), 2880: a partial last scale word
    *(LowLatencyDispatchSpec(hidden=2880, num_topk=8, num_experts=64, num_ranks=8, use_fp8=not f,
                             round_scale=ue, use_ue8m0=ue, wire_format=f, recv_scale_layout=l)
      for f, ue, l in (("", False, "deepgemm"), ("", True, "deepgemm"), ("mxfp8", False, "deepgemm"),
                       ("mxfp8", False, "cutlass_128x4"), ("nvfp4", False, "cutlass_128x4"))),
    # opaque rows (bytes moved as they are): with a side row at 7168, a row alone at 2880
    LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=64, num_ranks=8, use_fp8=False,
                           wire_format="opaque3712+64"),
    LowLatencyDispatchSpec(hidden=2880, num_topk=8, num_experts=64, num_ranks=8, use_fp8=False,
                           wire_format="opaque2880"),
    LowLatencyCombineSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2),
    LowLatencyCombineSpec(hidden=2880, num_topk=16, num_experts=128, num_ranks=8),
    # the combine wire formats (FP8 + float scales, LogFMT-10) at 7168, 4096 and 2880
    *(LowLatencyCombineSpec(hidden=h, num_topk=8, num_experts=64, num_ranks=8, wire_format=f)
      for f in ("fp8_e4m3_f32_128", "logfmt10") for h in (7168, 4096, 2880)),
    LowLatencyBarrierSpec(num_ranks=8),
    # the per-rank combine (EPGEN_LL_COMBINE=per_rank): hidden 7168/4096/2880 x top-k 8/16,
    # ranks 2/4/8
    LowLatencyCombineRankSpec(hidden=7168, num_topk=8, num_experts=288, num_ranks=2),
    LowLatencyCombineRankSpec(hidden=7168, num_topk=16, num_experts=256, num_ranks=4),
    LowLatencyCombineRankSpec(hidden=4096, num_topk=8, num_experts=256, num_ranks=8),
    LowLatencyCombineRankSpec(hidden=4096, num_topk=16, num_experts=32, num_ranks=2),
    LowLatencyCombineRankSpec(hidden=2880, num_topk=16, num_experts=128, num_ranks=8),
    LowLatencyCombineRankSpec(hidden=2880, num_topk=8, num_experts=64, num_ranks=4),
    InternodeNotifySpec(num_ranks=8, ranks_per_node=2, num_experts=256),
    InternodeNotifySpec(num_ranks=64, ranks_per_node=8, num_experts=1024),
    # internode dispatch: BF16 and FP8 (the partial last scale group of 2880), top-k 16 / 8 / none,
    # 2 x 1, 2 x 4 and 4 x 2 nodes x ranks
    InternodeDispatchSpec(hidden=7168, num_topk=8, num_ranks=2, ranks_per_node=1),
    InternodeDispatchSpec(hidden=2880, num_topk=16, num_ranks=8, ranks_per_node=4, dtype="fp8"),
    InternodeDispatchSpec(hidden=4096, num_topk=0, num_ranks=8, ranks_per_node=2),
    # internode combine: top-k 8 / 16 / none, biases, 2 x 1, 2 x 4 and 4 x 2
    InternodeCombineSpec(hidden=7168, num_topk=8, num_ranks=2, ranks_per_node=1),
    InternodeCombineSpec(hidden=2880, num_topk=16, num_ranks=8, ranks_per_node=4, num_biases=2),
    InternodeCombineSpec(hidden=4096, num_topk=0, num_ranks=8, ranks_per_node=2, num_biases=1),
]


def _normal_format_specs():
    """Every wire format at hidden 7168, 4096 and 2880 (partial last groups), through the
    normal dispatch in a node and across nodes (2 x 2): the kernels keyed by the bytes a row
    and its scales take (formats.WireFormat.data_bytes / scale_cols), as the ops build them."""
    out = []
    for name in formats.FORMATS:
        fmt = formats.get(name)
        for h in (7168, 4096, 2880):
            row, cols = fmt.data_bytes(h), fmt.scale_cols(h)
            out += [specs.normal_dispatch_rows_spec(row, cols, 8, 64, 4),
                    specs.internode_dispatch_spec(row, cols, 8, 4, 2)]
    return [s for s in dict.fromkeys(out) if s not in SPECS]


SPECS += _normal_format_specs()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return Cache(str(tmp_path_factory.mktemp("compile-cache")))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_family_compiles_for_sm90(spec, cache):
    stats = {}
    t0 = time.perf_counter()
    entry = jit.build(spec, "sm_90", cache, stats)
    elapsed = time.perf_counter() - t0
    m = entry.manifest
    assert stats["cached"] is False
    assert entry.cubin[:4] == b"\x7fELF"
    for kind in spec.entry_kinds:
        mangled = m["lowered_names"][spec.entry(kind)]
        assert mangled.encode() in entry.cubin
    assert m["resources"], "the link log reported no kernel resources"
    for kernel, res in m["resources"].items():
        assert res.get("spill_stores", 0) == 0, f"{kernel} spills registers: {res}"
    print(f"{spec.name}: nvrtc {m['nvrtc_seconds']:.2f}s link {m['link_seconds']:.2f}s "
          f"total {elapsed:.2f}s cubin {m['cubin_bytes']} B {m['resources']}")


def test_compile_error_carries_log_and_spec(cache, monkeypatch):
    from epgen.jit import codegen
    spec = LayoutSpec(num_ranks=2, num_experts=64, num_topk=4)
    real = codegen.render
    monkeypatch.setattr(codegen, "render", lambda s: real(s) + "\nthis is not C++;\n")
    with pytest.raises(CompileError) as e:
        jit.build(spec, "sm_90", cache)
    assert e.value.stage == "NVRTC"
    assert "LayoutSpec(" in str(e.value) and "sm_90" in str(e.value)
    assert "error" in e.value.log


def test_ll_payload_size_is_checked_against_the_kernel(cache, monkeypatch):
    """The launch sizes shared memory as spec.payload_bytes; a rendering whose value differs
    from the kernel's kPayload does not compile (the generated static_assert)."""
    spec = LowLatencyDispatchSpec(hidden=2880, num_topk=4, num_experts=32, num_ranks=4,
                                  use_fp8=False, wire_format="nvfp4")   # not in SPECS (memo)
    monkeypatch.setattr(LowLatencyDispatchSpec, "payload_bytes",
                        property(lambda s: (s.hidden // 2 + 15) // 16 * 16))   # scales forgotten
    with pytest.raises(CompileError) as e:
        jit.build(spec, "sm_90", cache)
    assert "payload size" in e.value.log


def test_precompiled_header_changes_speed_not_bytes(tmp_path, monkeypatch):
    """The prelude PCH (created once per toolchain/arch) must give byte-identical cubins."""
    spec = LayoutSpec(num_ranks=8, num_experts=128, num_topk=4)
    jit._memo.clear()
    monkeypatch.setenv("EPGEN_PCH", "0")
    plain = jit.build(spec, "sm_90", Cache(str(tmp_path / "plain")))
    jit._memo.clear()
    monkeypatch.setenv("EPGEN_PCH", "1")
    with_pch = jit.build(spec, "sm_90", Cache(str(tmp_path / "pch")))
    log = open(os.path.join(with_pch.path, "build.log")).read()
    assert "using precompiled header" in log, log[:2000]
    assert with_pch.key == plain.key and with_pch.cubin == plain.cubin
